"""Tensor groups merged concurrently, with the same output as one after the other.

Once the first passes are done, tensor groups are independent: each is computed by the same
single-threaded kernels (``reproducible_threads`` sets one torch intra-op thread, and each worker
thread starts by setting the caller's count again: torch keeps MKL's count per thread, so a
worker's SVDs would otherwise run on every core and their last bits vary from run to run), from
the same inputs, with randomness drawn from its own generator (``merging.rng``), so a group's
result does not depend on which thread computes it or when. ``merge_groups`` runs them on a small thread
pool and hands each result to ``commit`` in the calling thread:

* a sink that takes groups in any order (the saved model's planned shards: every tensor has
  its offset) gets them as they finish, and a worker that would wait behind a large group may
  take a later one;
* any other sink (artifacts, adapters: files depend on the order) gets them in plan order;
  a finished group waits for the ones before it, and counts as in flight meanwhile.

Memory is bounded by the groups in flight: at most ``workers`` computed or waiting, and never two
large groups at once (vocabulary-sized matrices, more than ``LARGE_FACTOR`` times the median
group: their working sets dominate the peak). On an error the groups in flight finish, nothing more
starts, and the error of the earliest group in plan order is raised.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from merging.plan import TensorEntry

__all__ = ["merge_groups", "group_workers", "MAX_WORKERS", "LARGE_FACTOR"]

MAX_WORKERS = 2
"""Groups merged at once on the CPU at most: each one in flight adds its working set."""

LARGE_FACTOR = 8
"""A group larger than this many times the median group never runs beside another such group."""

Result = TypeVar("Result")


def group_workers(device: torch.device) -> int:
    """How many groups to merge at once: one per core available to this process, at most
    ``MAX_WORKERS``; one on CUDA (one device, whose kernels already use it whole)."""
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


def _libc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: hands the free memory of every malloc arena back to the system
    (a no-op elsewhere). Tensors of 1-32 MB come from per-thread arenas once glibc has raised its
    mmap threshold, and memory one worker freed stays resident while the other allocates anew."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def merge_groups(entries: Sequence[TensorEntry], merge: Callable[[TensorEntry], Result],
                 commit: Callable[[TensorEntry, Result], None], workers: int, any_order: bool) -> None:
    """``commit(entry, merge(entry))`` for every entry, ``merge`` on up to ``workers`` threads,
    ``commit`` in the calling thread (in plan order unless ``any_order``)."""
    trim = _libc_trim()
    if workers <= 1 or len(entries) <= 1:
        for entry in entries:
            commit(entry, merge(entry))
            trim()
        return
    sizes = [math.prod(e.shape) for e in entries]
    large_above = LARGE_FACTOR * statistics.median(sizes)
    large = [size > large_above for size in sizes]
    waiting = list(range(len(entries)))  # not started, in plan order
    running: dict[Future, int] = {}
    finished: dict[int, Result] = {}  # done, waiting for their turn (plan order only)
    failed: dict[int, BaseException] = {}
    next_commit = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="mergeflow-group", initializer=torch.set_num_threads,
                            initargs=(torch.get_num_threads(),)) as pool:
        while running or (waiting and not failed):
            while waiting and not failed and len(running) + len(finished) < workers:
                big_running = any(large[i] for i in running.values())
                eligible = (i for i in (waiting if any_order else waiting[:1]) if not (large[i] and big_running))
                pick = next(eligible, None)
                if pick is None:
                    break
                waiting.remove(pick)
                running[pool.submit(merge, entries[pick])] = pick
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            trim()
            for future in sorted(done, key=running.__getitem__):
                index = running.pop(future)
                error = future.exception()
                if error is not None:
                    failed[index] = error
                elif failed:  # the merge fails: nothing more is written
                    continue
                elif any_order:
                    commit(entries[index], future.result())
                else:
                    finished[index] = future.result()
            while not any_order and not failed and next_commit in finished:
                commit(entries[next_commit], finished.pop(next_commit))
                next_commit += 1
    if failed:
        raise failed[min(failed)]
