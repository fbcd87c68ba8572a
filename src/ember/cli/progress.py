"""What ``ember deploy`` shows while the server works: its progress events as bars or as lines.

On a terminal, the import and the first load are bars with bytes and percent (a spinner until the
size is known). Piped or redirected, the same progress comes as plain lines, one per tenth::

    importing minilm: 45.4 MB of 90.9 MB (50%)
    ✓ stored 90.9 MB
    loading minilm: 90.9 MB of 90.9 MB (100%)
    ✓ ready in 412 ms

The events are the server's (``POST /admin/models`` streams them): ``importing`` and ``loading``
carry ``bytes``, ``total_bytes`` and ``percent`` as the weights are written and copied.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)

from ember.cli.common import size_text

__all__ = ["DeployProgress"]

#: Piped, a progress line is printed each time the percent passes a multiple of this.
LINE_STEP_PERCENT = 10


class DeployProgress:
    """Call it with each deploy event; use it as a context manager around the deploy."""

    def __init__(self, console: Console, source: str) -> None:
        self._console = console
        self._source = source
        self._bars: Progress | None = None
        self._task: TaskID | None = None
        self._stage = ""
        self._printed_step = -1

    def __enter__(self) -> DeployProgress:
        if self._console.is_terminal:
            self._bars = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TaskProgressColumn(),
                console=self._console,
                transient=True,
            )
            self._bars.start()
        self._begin("importing", f"importing {self._source}")
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        stage = str(event.get("stage", ""))
        model = str(event.get("model", ""))
        if stage in ("importing", "loading") and "total_bytes" in event:
            self._bytes(stage, model, int(event.get("bytes", 0)), int(event["total_bytes"]))
        elif stage == "loading":
            self._begin("loading", f"loading {model}")
        elif stage == "stored":
            self._say(f"[green]✓[/] stored {size_text(int(event.get('bytes', 0)))}")
        elif stage == "ready":
            self._say(f"[green]✓[/] ready in {1000 * float(event.get('load_s', 0.0)):.0f} ms")

    def _begin(self, stage: str, description: str) -> None:
        if stage == self._stage:
            return
        self._stage, self._printed_step = stage, -1
        if self._bars is not None:
            if self._task is not None:
                self._bars.remove_task(self._task)
            self._task = self._bars.add_task(description, total=None)

    def _bytes(self, stage: str, model: str, done: int, total: int) -> None:
        self._begin(stage, f"{stage} {model}")
        if self._bars is not None and self._task is not None:
            self._bars.update(self._task, completed=done, total=max(total, 1), refresh=True)
            return
        percent = 100 * done // total if total else 100
        step = percent // LINE_STEP_PERCENT
        if step > self._printed_step:
            self._printed_step = step
            self._console.print(
                f"{stage} {model}: {size_text(done)} of {size_text(total)} ({percent}%)", highlight=False
            )

    def _say(self, markup: str) -> None:
        self._console.print(markup, highlight=False)
