"""A tiny reporting interface so library code shows progress without knowing about the terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def update(self, **fields: object) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Task]: ...
    def info(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **fields: object) -> None:
        pass


class NullReporter:
    """Reports nothing (library use, tests)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()

    def info(self, message: str) -> None:
        self.messages.append(message)


class RichReporter:
    """Rich progress bars on stderr (used by the CLI)."""

    def __init__(self, console=None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if total is None:  # a step of unknown length: a spinner and the time, no "0/?" bar
            columns = [
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
            ]
        else:
            columns = [
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, status="")

            class _Task:
                def advance(self, n: int = 1) -> None:
                    progress.advance(task_id, n)

                def update(self, **fields: object) -> None:
                    status = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                    progress.update(task_id, status=status)

            try:
                yield _Task()
            except BaseException:
                # A failed step's half-full bar is noise: the error line that follows says what went wrong.
                progress.remove_task(task_id)
                raise
            # Finished early (early stopping ran fewer epochs than planned) or of unknown length: end the bar at
            # what was done, full, instead of leaving it frozen part-way (884/1020).
            done = progress.tasks[0].completed if progress.tasks else 0
            done = max(done, 1) if total is None else done
            progress.update(task_id, total=done, completed=done)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)
