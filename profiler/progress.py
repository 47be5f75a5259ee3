"""Progress reporting of a profiling run: per-phase rich bars with an ETA, on stderr.

Owns: the `Reporter` interface workers call (`phase`, `advance`, `note`), its two transports
(a multiprocessing queue to the parent that started local workers, or a rich progress bar in the
same process under torchrun), and the parent's loop that turns queue events into bars.
Does not own: what is measured or when (run.py, workers.py).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def phase(self, name: str, total: int) -> None: ...

    def advance(self, name: str, steps: int = 1) -> None: ...

    def note(self, text: str) -> None: ...


class NullReporter:
    """For ranks that do not show progress."""

    def phase(self, name: str, total: int) -> None:
        pass

    def advance(self, name: str, steps: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class QueueReporter:
    """Sends events to the parent process (local mode); picklable via the queue it wraps."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def phase(self, name: str, total: int) -> None:
        self.queue.put(("phase", name, total))

    def advance(self, name: str, steps: int = 1) -> None:
        self.queue.put(("advance", name, steps))

    def note(self, text: str) -> None:
        self.queue.put(("note", text))


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class RichReporter:
    """Draws the bars itself (torchrun mode, or the parent handling queue events)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def phase(self, name: str, total: int) -> None:
        """Start phase `name`; the phases before it are over (their clocks stop)."""
        for other, task_id in self.tasks.items():
            if other != name:
                self._close(task_id)
        if name in self.tasks:
            self.progress.update(self.tasks[name], total=total)
        else:
            self.tasks[name] = self.progress.add_task(name, total=total)

    def _close(self, task_id: TaskID) -> None:
        """A phase cut short (budget, memory) shows what it did rather than a stuck bar."""
        task = next(t for t in self.progress.tasks if t.id == task_id)
        if task.total is not None and task.completed < task.total:
            self.progress.update(task_id, total=task.completed)
        self.progress.stop_task(task_id)

    def advance(self, name: str, steps: int = 1) -> None:
        if name not in self.tasks:
            self.phase(name, 0)
        self.progress.advance(self.tasks[name], steps)

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def finish(self) -> None:
        for task_id in self.tasks.values():
            self._close(task_id)

    def handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "phase":
            self.phase(event[1], event[2])
        elif kind == "advance":
            self.advance(event[1], event[2])
        elif kind == "note":
            self.note(event[1])
        else:
            log.debug("unknown progress event %r", kind)
