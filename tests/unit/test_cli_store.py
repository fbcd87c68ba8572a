"""Tests for ``ember store ...``: ls, import, verify, export and bench, working on --home directly."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from typer.testing import CliRunner

from ember.cli import app
from ember.store import map_checkpoint

runner = CliRunner()


def test_import_ls_verify_export(tmp_path: Path) -> None:
    home = tmp_path / "home"
    named = {"a": torch.randn(8, 8).to(torch.bfloat16), "b": torch.arange(4)}
    safetensors.torch.save_file(named, tmp_path / "src.safetensors")

    result = runner.invoke(
        app, ["store", "import", str(tmp_path / "src.safetensors"), "--out", str(tmp_path / "w.ember")]
    )
    assert result.exit_code == 0, result.output
    assert torch.equal(map_checkpoint(tmp_path / "w.ember")["b"], named["b"])

    result = runner.invoke(
        app, ["store", "import", str(tmp_path / "src.safetensors"), "--key", "m@1", "--home", str(home)]
    )
    assert result.exit_code == 0 and "stored m@1" in result.output, result.output
    result = runner.invoke(app, ["store", "ls", "--home", str(home)])
    assert result.exit_code == 0 and "m@1" in result.output and "cool: 1 models" in result.output
    result = runner.invoke(app, ["store", "verify", "--home", str(home)])
    assert result.exit_code == 0 and "m@1: ok" in result.output
    result = runner.invoke(
        app, ["store", "export", "m@1", "--out", str(tmp_path / "back.safetensors"), "--home", str(home)]
    )
    assert result.exit_code == 0, result.output
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    assert torch.equal(back["a"].view(torch.int16), named["a"].view(torch.int16))

    weights = home / "store" / "models" / "m@1" / "weights.ember"
    damaged = bytearray(weights.read_bytes())
    damaged[4096] ^= 1
    weights.write_bytes(damaged)
    result = runner.invoke(app, ["store", "verify", "--home", str(home)])
    assert result.exit_code == 1 and "crc32" in result.output


def test_import_errors_say_what_to_do(tmp_path: Path) -> None:
    result = runner.invoke(app, ["store", "import", str(tmp_path / "none.bin"), "--out", str(tmp_path / "w.ember")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = runner.invoke(app, ["store", "import", str(tmp_path / "none.bin")])
    assert result.exit_code == 1 and "exactly one of" in result.output


def test_bench_runs_small(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["store", "bench", "--size-gb", "0.004", "--repeat", "1", "--no-cold", "--json", str(out), "--no-save"]
    args += ["--home", str(tmp_path / "home")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {"method", "source", "gb_per_s", "ratio_to_ceiling"} <= set(rows[0])
    assert {r["method"] for r in rows} >= {"ceiling (parallel pread)", "ember (mmap)", "safetensors.load_file"}
