"""``ember usage``: what each model and tenant has held, through ``GET /admin/usage``.

    ember usage                          everything recorded, per model and per tenant
    ember usage --since 1h               the last hour (also 30m, 2d, 90s, or an ISO date and time)
    ember usage --tenant acme --json     one tenant's (admin keys), as JSON

``ember.metering`` defines the figures: device-seconds (seconds x hot instances), device GB-seconds,
host GB-seconds of the warm tier, and requests; "always on" is what one hot instance kept for the
whole window would have held.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from ember.cli.common import DASH, DEFAULT_HOME, HomeOption, UrlOption, console, errors, fail, print_table
from ember.client import DEFAULT_URL, Client

__all__ = ["parse_since", "usage"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float) -> float:
    """Wall-clock seconds for ``text``: a duration back from ``now`` (``90s``, ``30m``, ``1h``, ``2d``) or
    an ISO 8601 date and time (local time unless it names a zone)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"--since takes a duration like 30m, 1h or 2d, or a date and time like 2026-12-04T09:00; not {text!r}"
        ) from None


def usage(
    tenant: Annotated[str | None, typer.Option("--tenant", help="One tenant's usage (admin keys).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="From when: 30m, 1h, 2d, or an ISO date.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (what GET /admin/usage answers).")] = False,
    url: UrlOption = DEFAULT_URL,
    home: HomeOption = DEFAULT_HOME,
) -> None:
    """Show device-seconds, GB-seconds and requests per model and tenant, beside always-on."""
    start = None
    if since is not None:
        try:
            start = parse_since(since, time.time())  # clock-ok: the CLI turns the user's words into a time
        except ValueError as exc:
            fail(str(exc))
    with errors(url), Client(url, home=home) as client:
        report = client.usage(start, tenant)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not report["models"]:
        console.print("no usage recorded" + ("" if start is None else " in that window"), highlight=False)
        return
    print_table(_table(report["models"], "model"))
    console.print()
    print_table(_table(report["tenants"], "tenant"))


def _table(rows: list[Mapping[str, Any]], first: str) -> Table:
    table = Table(box=None, header_style="bold")
    headers = [first, *(("tenant",) if first == "model" else ()), "device-s", "device GB-s", "host GB-s", "requests"]
    if first == "model":
        headers.append("always-on device-s")
    for header in headers:
        table.add_column(header, justify="left" if header in ("model", "tenant") else "right")
    for row in rows:
        cells = [str(row[first])]
        if first == "model":
            cells.append(str(row["tenant"]))
        cells += [
            f"{float(row['device_seconds']):.1f}",
            f"{float(row['device_gb_seconds']):.3f}",
            f"{float(row['host_gb_seconds']):.3f}",
            str(row["requests"]),
        ]
        if first == "model":
            always = row.get("always_on")
            cells.append(DASH if not always else f"{float(always['device_seconds']):.1f}")
        table.add_row(*cells)
    return table
