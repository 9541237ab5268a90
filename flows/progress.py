"""A rich progress bar over tensor groups, for the CLI and the DVC stage entry point."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[int, int, str], None] | None]:
    """Yields ``update(done, total, name)`` (or None when disabled) while the bar is shown."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), transient=True)
    task_id = bar.add_task("", total=None)

    def update(done: int, total: int, name: str) -> None:
        bar.update(task_id, completed=done, total=total, description=name)

    with bar:
        yield update
