"""``ember describe NAME``: one deployed model in full, through the admin API.

    ember describe minilm           its inputs and outputs, SLO, tier, batching, keep-alives, options
    ember describe minilm --json    the same as JSON (``GET /admin/models/NAME``)

Errors print ``error: <what to do>`` and exit 1, as the rest of the CLI does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ember.cli.common import (
    DASH,
    DEFAULT_HOME,
    HomeOption,
    UrlOption,
    cold_start,
    console,
    errors,
    print_table,
    size_text,
)
from ember.client import DEFAULT_URL, Client

__all__ = ["describe", "describe_model"]


def describe(
    name: Annotated[str, typer.Argument(help="The model's name, as `ember ls` shows it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Show one model: inputs and outputs, SLO, tier, batching, keep-alives, device and options."""
    with errors(url), Client(url, home=home) as client:
        model = client.model(name)
    if as_json:
        typer.echo(json.dumps(model, indent=2))
        return
    console.print(Text.assemble((str(model["name"]), "bold"), f" v{model['version']}"), highlight=False)
    print_table(describe_model(model))
    settings: Mapping[str, Any] = model.get("settings") or {}
    for title in ("inputs", "outputs"):
        console.print(Text(title, style="bold"))
        print_table(tensors_table(settings.get(title) or []))


def describe_model(model: Mapping[str, Any]) -> Table:
    """The model's facts as a two-column table: what, and its value."""
    settings: Mapping[str, Any] = model.get("settings") or {}
    attained = model.get("slo_attainment")
    met = DASH if attained is None else f"{100 * float(attained):.1f}% of {int(model.get('requests', 0)):,} requests"
    rows = [
        ("source", str(model.get("source") or DASH)),
        ("tenant", str(model.get("tenant", "default"))),
        ("task", str(model.get("task") or DASH)),
        ("tier", f"{model['tier']}, {model.get('instances', 0)} of at most {model.get('max_instances', 1)} instances"),
        ("size", size_text(int(model.get("bytes", 0)))),
        ("SLO", f"{float(model['slo_ms']):g} ms, met by {met}"),
        ("unmeetable requests", str(settings.get("on_unmeetable", DASH)).replace("_", "-")),
        ("batching", _batching(settings)),
        ("keep-alive", _keepalive(settings)),
        ("device", str(settings.get("device", DASH))),
        ("options", json.dumps(settings["options"]) if settings.get("options") else "none"),
        ("last cold start", cold_start(model.get("last_cold_start"))),
    ]
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def tensors_table(tensors: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for header in ("  name", "datatype", "shape"):
        table.add_column(header)
    for t in tensors:
        table.add_row(f"  {t['name']}", str(t["datatype"]), json.dumps(list(t["shape"])))
    return table


def _batching(settings: Mapping[str, Any]) -> str:
    if "max_batch_size" not in settings:
        return DASH
    return (
        f"up to {settings['max_batch_size']} rows, waiting at most {float(settings['max_batch_wait_ms']):g} ms; "
        f"at most {settings['max_queue']} queued"
    )


def _keepalive(settings: Mapping[str, Any]) -> str:
    if "keepalive_hot_s" not in settings:
        return DASH
    return f"hot {float(settings['keepalive_hot_s']):g} s, then warm {float(settings['keepalive_warm_s']):g} s"
