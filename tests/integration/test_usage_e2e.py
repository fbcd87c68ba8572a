"""Metered usage on a real server: ``ember usage`` and ``GET /admin/usage`` agree, and a restart keeps it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import EXAMPLES, Server, served


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Server]:
    with served(Server(tmp_path / "home", workers=1)) as running:
        yield running


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """The recorded figures; "always_on" and "until" grow with the clock, so they are left out."""
    return {
        "models": [{k: v for k, v in row.items() if k != "always_on"} for row in report["models"]],
        "tenants": report["tenants"],
        "total": report["total"],
    }


def test_usage_is_the_same_through_the_cli_and_the_api_and_survives_a_restart(own: Server) -> None:
    own.deploy(EXAMPLES / "linear.py:Linear", "--on-unmeetable", "best-effort")
    for _ in range(3):
        response = own.infer_json("linear", {"x": np.ones((1, 16), dtype=np.float32)})
        assert response.status_code == 200, response.text
    # Cool: nothing is held any more, so the figures stop moving and two reads must agree.
    assert own.http.post(f"{own.url}/admin/models/linear/unload", params={"tier": "cool"}).status_code == 200
    api = own.get_json("/admin/usage")
    (row,) = api["models"]
    assert row["model"] == "linear" and row["tenant"] == "default"
    assert row["device_seconds"] > 0 and row["device_gb_seconds"] > 0 and row["host_gb_seconds"] > 0
    assert row["requests"] == 3
    assert row["always_on"]["device_seconds"] >= row["device_seconds"]

    done = own.cli("usage", "--json")
    assert done.returncode == 0, done.stderr
    assert _figures(json.loads(done.stdout)) == _figures(api)
    table = own.cli("usage", "--since", "1h")
    assert table.returncode == 0 and "linear" in table.stdout and "default" in table.stdout, table.stdout

    metrics = own.http.get(f"{own.url}/metrics").text
    assert 'ember_device_seconds_total{model="linear",tenant="default"}' in metrics

    assert own.stop() == 0
    own.start()
    after = own.get_json("/admin/usage")
    assert _figures(after) == _figures(api)
    assert own.get_json("/admin/usage?since=4102444800")["models"] == []  # the year 2100: nothing yet
