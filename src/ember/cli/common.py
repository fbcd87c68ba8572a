"""What every ``ember`` command module shares: consoles, the ``--url``/``--home`` options, error
printing, and making a deploy source absolute."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ember.errors import EmberError

__all__ = [
    "DASH",
    "DEFAULT_HOME",
    "HomeOption",
    "UrlOption",
    "absolute_source",
    "cold_start",
    "console",
    "err_console",
    "errors",
    "fail",
    "print_error",
    "print_table",
    "size_text",
]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="EMBER_URL", help="The Ember server to talk to.", show_envvar=True)
]
HomeOption = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="EMBER_HOME",
        help="Ember's home: registry, store, logs, and admin.key (read by the CLI on the server's machine).",
        show_envvar=True,
    ),
]
DEFAULT_HOME = Path("~/.ember")
DASH = "\N{EN DASH}"


def size_text(num_bytes: float) -> str:
    """A byte count for people: ``512 B``, ``12.3 kB``, ``2.5 MB``, ``1.25 GB`` (never ``0.0 MB``)."""
    if num_bytes < 1e3:
        return f"{num_bytes:.0f} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if num_bytes < 1e3 * scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 1e9:.2f} GB"


def print_table(table: Table, to: Console | None = None) -> None:
    """Print ``table`` on ``to`` (the standard console by default).

    On a terminal it fits the window; to a pipe or a file it is printed at its natural width, so no
    cell is cut to "…" (a pipe has no width, and rich would assume 80 columns).
    """
    target = to or console
    if target.is_terminal:
        target.print(table)
        return
    natural = Console(width=1 << 14).measure(table).maximum
    Console(file=target.file, width=max(natural, 20), soft_wrap=True, no_color=target.no_color).print(table)


def cold_start(last: Mapping[str, Any] | None) -> str:
    """A model's last cold start as ``tier N ms`` (a dash if it had none)."""
    if not last:
        return DASH
    return f"{last.get('tier', '?')} {1000 * float(last.get('seconds', 0.0)):.0f} ms"


def absolute_source(source: str, cwd: Path | None = None) -> str:
    """``source`` with a local file or folder made absolute (the server's working directory differs).

    ``file.py:Class`` becomes ``/abs/file.py:Class``; a folder or a .pt2/.pt file becomes absolute;
    ``module:Class`` and paths that do not exist here are sent unchanged.
    """
    base = cwd or Path.cwd()

    def local(path: str) -> Path | None:
        candidate = Path(path).expanduser()
        candidate = candidate if candidate.is_absolute() else base / candidate
        return candidate.resolve() if candidate.exists() else None

    whole = local(source)
    if whole is not None:
        return str(whole)
    ref, sep, attr = source.rpartition(":")
    if sep and ref.endswith(".py") and attr:
        file = local(ref)
        if file is not None:
            return f"{file}:{attr}"
    return source


def print_error(message: str) -> None:
    err_console.print(Text(f"error: {message}", style="red"))


def fail(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(1)


@contextlib.contextmanager
def errors(url: str | None) -> Iterator[None]:
    """Ember's errors and transport failures as one red line and exit status 1."""
    try:
        yield
    except EmberError as exc:
        fail(exc.message)
    except httpx.ConnectError:
        fail(f"cannot reach Ember at {url}; start it with `ember serve`, or pass --url (EMBER_URL)")
    except httpx.TimeoutException:
        fail(f"Ember at {url} did not answer in time; `ember status` shows whether it is busy")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        fail(f"talking to Ember at {url} failed: {exc}")
