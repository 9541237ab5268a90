"""Typed errors: each says what is wrong, where (model, tensor, key) and how to fix it."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = [
    "exit_on_error",
    "EXIT_BAD_INPUT",
    "MergeflowError",
    "MergeConfigError",
    "UnknownMethodError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "AdapterError",
    "NonFiniteDeltaError",
    "NonFiniteOutputError",
    "OutputExistsError",
    "OutputWriteError",
    "InsufficientDiskSpaceError",
    "OutputLayoutError",
    "ArtifactError",
    "StatisticsError",
]


class MergeflowError(Exception):
    """Base of every error mergeflow raises for bad input; the CLI maps it to exit code 2."""


class MergeConfigError(MergeflowError, ValueError):
    """A config file or parameter is malformed, missing or out of range."""


class UnknownMethodError(MergeConfigError):
    """A merge method name is not in the registry."""


class CheckpointNotFoundError(MergeflowError, FileNotFoundError):
    """A model folder, file or hub id cannot be found."""


class CheckpointMismatchError(MergeflowError, ValueError):
    """A model's tensors do not line up with the base (names, shapes or dtypes)."""


class UnsafeCheckpointError(MergeflowError):
    """A pickle checkpoint or remote code would be needed and the user did not allow it."""


class AdapterError(MergeflowError, ValueError):
    """A PEFT adapter folder is malformed, unsupported, or made for another base."""


class NonFiniteDeltaError(MergeflowError, ValueError):
    """A delta (fine-tuned minus base) holds NaN or Inf."""


class NonFiniteOutputError(MergeflowError, ValueError):
    """A merged tensor holds NaN or Inf (a parameter or the output dtype made it overflow)."""


class OutputExistsError(MergeflowError, FileExistsError):
    """The target folder exists and overwriting was not asked for."""


class OutputWriteError(MergeflowError, OSError):
    """The target cannot be written (permissions, missing parent, disk)."""


class InsufficientDiskSpaceError(OutputWriteError):
    """The file system of the target has less free space than the plan will write."""


class OutputLayoutError(MergeflowError):
    """The tensors written do not match the planned output layout (a tensor missing, written
    twice, or of another shape or dtype than planned)."""


class ArtifactError(MergeflowError):
    """A pipeline artifact is missing or its digest does not match its manifest."""


class StatisticsError(MergeflowError, ValueError):
    """A data-aware method's statistics file is missing, of the wrong kind, or lacks a tensor it needs."""


EXIT_BAD_INPUT = 2


EXIT_TERMINATED = 128 + signal.SIGTERM


def _terminate(signum, frame) -> None:
    raise SystemExit(EXIT_TERMINATED)


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """The one mapping of these errors to a command line: a one-line message on stderr and
    exit code 2, no traceback (every ``mergeflow`` command and ``python -m`` entry point).
    SIGTERM becomes an exception too, so that it cleans up as an error does (temporary
    folders removed, the target untouched) and exits with 143; SIGINT does so as
    ``KeyboardInterrupt``."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    except MergeflowError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
