"""This host's measured links: which bench rows become which link, the file, and how serving uses it."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from ember.cli import commands as cli
from ember.client import Client
from ember.clock import VirtualClock
from ember.config import DeploySpec
from ember.errors import DeadlineUnmeetable
from ember.policies.latency import Bandwidths
from ember.policies.tiers import Tier
from ember.service import EmberService, ServeOptions
from ember.store.bandwidths import BANDWIDTHS_FILE, PROMOTE, Row, measured_bandwidths, read_bandwidths, save_bandwidths
from ember.testing import FakeBackend, run_in_virtual_time

runner = CliRunner()
DEFAULTS = Bandwidths()


def _row(method: str, source: str, gb_per_s: float) -> Row:
    return Row(method, source, gb_per_s, 1.0, 0.1, 100_000_000)


CPU_ROWS = [
    _row("ceiling (parallel pread)", "page cache", 9.0),
    _row(PROMOTE, "page cache", 3.0),
    _row(PROMOTE, "cold disk", 0.5),
    _row("ember (mmap)", "page cache", 20.0),
    _row("ember (mmap)", "shm", 7.0),
    _row("ember (read into new buffer)", "shm", 4.0),
]


# -- which rows ------------------------------------------------------------------------------------


def test_a_cpu_host_takes_the_promotion_from_cold_disk_and_the_mapped_load_from_shm() -> None:
    links, sources = measured_bandwidths(CPU_ROWS, cuda=False)
    assert links == Bandwidths(0.5e9, 7.0e9, DEFAULTS.setup_s)
    assert (sources["disk_bytes_per_s"]["method"], sources["disk_bytes_per_s"]["source"]) == (PROMOTE, "cold disk")
    assert sources["host_to_device_bytes_per_s"]["source"] == "shm"
    assert "default" in sources["setup_s"]


def test_without_cold_disk_or_shm_the_page_cache_rows_stand_in() -> None:
    rows = [r for r in CPU_ROWS if r.source == "page cache"]
    links, _ = measured_bandwidths(rows, cuda=False)
    assert links == Bandwidths(3.0e9, 20.0e9, DEFAULTS.setup_s)


def test_a_cuda_host_takes_the_staged_loader_to_the_device_not_the_bare_pinned_copy() -> None:
    rows = [
        *CPU_ROWS,
        _row("pinned h2d copy (ceiling)", "shm -> cuda", 50.0),
        _row("ember (staged) -> cuda", "shm -> cuda", 21.0),
        _row("ember (staged) -> cuda", "page cache -> cuda", 12.0),
    ]
    links, sources = measured_bandwidths(rows, cuda=True)
    assert (links.disk_bytes_per_s, links.host_to_device_bytes_per_s) == (0.5e9, 21.0e9)
    assert sources["host_to_device_bytes_per_s"]["method"] == "ember (staged) -> cuda"


def test_rows_without_the_promotion_are_refused() -> None:
    with pytest.raises(ValueError, match="promotion"):
        measured_bandwidths([r for r in CPU_ROWS if r.method != PROMOTE], cuda=False)
    with pytest.raises(ValueError, match="warm tier"):
        measured_bandwidths(CPU_ROWS, cuda=True)  # no "-> cuda" rows at all


# -- the file --------------------------------------------------------------------------------------


def test_saved_links_read_back_with_their_date(tmp_path: Path) -> None:
    links = Bandwidths(0.5e9, 7.0e9, 0.02)
    save_bandwidths(tmp_path / BANDWIDTHS_FILE, links, {"why": "test"}, {"cpus": 2}, 1_800_000_000.0)
    read = read_bandwidths(tmp_path)
    assert read.bandwidths == links and read.warning is None
    assert read.measured_at == "2027-01-15T08:00:00+00:00"
    assert "0.50 GB/s" in read.describe() and "measured 2027-01-15" in read.describe()
    body = json.loads((tmp_path / BANDWIDTHS_FILE).read_text())
    assert body["host"]["cpus"] == 2 and body["sources"] == {"why": "test"}


def test_no_file_means_the_defaults_without_a_warning(tmp_path: Path) -> None:
    read = read_bandwidths(tmp_path)
    assert read.bandwidths == DEFAULTS and read.warning is None and read.measured_at is None
    assert "defaults" in read.describe()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not a bandwidths file"),
        ('{"version": 1, "bandwidths": {"disk_bytes_per_s": -5}}', "disk_bytes_per_s"),
        ('{"version": 1, "bandwidths": {"disk_bytes_per_sec": 5e8}}', "disk_bytes_per_sec"),
        ('{"version": 2, "bandwidths": {}}', "version"),
        ('{"version": 1}', "bandwidths"),
    ],
)
def test_a_malformed_file_warns_and_the_defaults_apply(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / BANDWIDTHS_FILE).write_text(text)
    read = read_bandwidths(tmp_path)
    assert read.bandwidths == DEFAULTS and read.measured_at is None
    assert read.warning is not None and problem in read.warning and "ember store bench" in read.warning


# -- serving with them -----------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "model.py"
    path.write_text("class M: ...\n")
    return f"{path}:M"


def _service(home: Path, clock: VirtualClock) -> EmberService:
    options = ServeOptions(home=home, warm_root=home / "shm")
    return EmberService(options, clock=clock, backend=FakeBackend(clock))


def _spec(source: str, **kw: object) -> DeploySpec:
    return DeploySpec.model_validate({"source": source, "name": "m", **kw})


def _save(home: Path, links: Bandwidths) -> None:
    save_bandwidths(home / BANDWIDTHS_FILE, links, {}, {}, 1_800_000_000.0)


def test_measured_links_set_the_predicted_first_load_of_a_cool_model(tmp_path: Path, model_file: str) -> None:
    home = tmp_path / "home"
    predicted: list[float] = []

    async def main(clock: VirtualClock) -> None:
        async with _service(home, clock) as service:
            if not predicted:
                await service.deploy(_spec(model_file), load=False)
            assert service.controller.tier("m") is Tier.COOL
            size = service.info("m").bytes
            predicted.append(service.controller.start_delay_s("m"))
            assert predicted[-1] == pytest.approx(service.bandwidths.bandwidths.load_s(size, Tier.COOL))

    run_in_virtual_time(main)
    _save(home, Bandwidths(disk_bytes_per_s=1e3, host_to_device_bytes_per_s=2e3, setup_s=0.2))
    run_in_virtual_time(main)  # the same home restarted: the model is still cool, never loaded
    default_s, measured_s = predicted
    assert default_s < 0.1 < 1.0 < measured_s  # the defaults' ~50 ms set-up; a 1 kB/s disk takes seconds


def test_a_slow_measured_disk_refuses_a_tight_slo_that_the_defaults_would_serve(
    tmp_path: Path, model_file: str
) -> None:
    x = {"x": np.ones((1, 4), dtype=np.float32)}

    async def served(clock: VirtualClock) -> None:
        async with _service(tmp_path / "defaults", clock) as service:
            await service.deploy(_spec(model_file, slo_ms=5000), load=False)
            assert (await service.infer("m", x))["x"][0, 0] == 1.0

    async def refused(clock: VirtualClock) -> None:
        async with _service(tmp_path / "measured", clock) as service:
            assert service.bandwidths.measured_at is not None
            await service.deploy(_spec(model_file, slo_ms=5000), load=False)
            start = clock.now()
            with pytest.raises(DeadlineUnmeetable) as caught:
                await service.infer("m", x)
            assert clock.now() == start and caught.value.http_status == 429  # at once, not after a load

    run_in_virtual_time(served)  # predicted ~50 ms with the defaults
    _save(tmp_path / "measured", replace(DEFAULTS, disk_bytes_per_s=100.0))  # ~40 s for its ~4 kB
    run_in_virtual_time(refused)


def test_a_malformed_file_is_a_warning_at_start_and_the_defaults_apply(
    tmp_path: Path, model_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / BANDWIDTHS_FILE).write_text('{"version": 1, "bandwidths": {"disk_bytes_per_s": "fast"}}')

    async def main(clock: VirtualClock) -> None:
        with caplog.at_level(logging.WARNING, logger="ember.service"):
            service = _service(home, clock)
        async with service:
            await service.deploy(_spec(model_file), load=False)
            size = service.info("m").bytes
            assert service.controller.start_delay_s("m") == pytest.approx(DEFAULTS.load_s(size, Tier.COOL))
            assert service.status()["bandwidths"]["measured"] is False

    run_in_virtual_time(main)
    assert any(BANDWIDTHS_FILE in r.getMessage() and "default" in r.getMessage() for r in caplog.records)


def test_ember_status_shows_the_links_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "home", Bandwidths(0.25e9, 3.5e9, 0.05))
    statuses: list[dict[str, object]] = []

    async def main(clock: VirtualClock) -> None:
        async with _service(tmp_path / "home", clock) as service:
            statuses.append(service.status())

    run_in_virtual_time(main)
    body = json.loads(json.dumps(statuses[0], default=str))
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    monkeypatch.setattr(cli, "Client", lambda url, **kw: Client(url, transport=transport, **kw))
    result = runner.invoke(cli.app, ["status"])
    assert result.exit_code == 0, result.output
    assert "cool->warm 0.25 GB/s" in result.output and "warm->hot 3.50 GB/s" in result.output
    assert "measured 2027-01-15" in result.output


# -- the bench writes it ---------------------------------------------------------------------------


def test_store_bench_saves_the_links_it_measured(tmp_path: Path) -> None:
    home = tmp_path / "home"
    args = ["store", "bench", "--size-gb", "0.004", "--repeat", "1", "--no-cold", "--home", str(home)]
    result = runner.invoke(cli.app, [*args, "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    body = json.loads((home / BANDWIDTHS_FILE).read_text())
    rows = {(r["method"], r["source"]): r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    promote = rows[(PROMOTE, "page cache")]  # --no-cold: the page cache stands in for the disk
    assert body["sources"]["disk_bytes_per_s"] == promote
    assert body["bandwidths"]["disk_bytes_per_s"] == pytest.approx(promote["gb_per_s"] * 1e9)
    hot = body["sources"]["host_to_device_bytes_per_s"]
    assert hot["method"] == ("ember (staged) -> cuda" if body["host"]["cuda"] else "ember (mmap)")
    assert read_bandwidths(home).bandwidths.host_to_device_bytes_per_s == pytest.approx(hot["gb_per_s"] * 1e9)
    assert not list(home.glob("ember-bench-*"))  # the checkpoints are gone

    async def main(clock: VirtualClock) -> None:
        async with _service(home, clock) as service:  # what `ember serve` on this home predicts with
            assert service.bandwidths.bandwidths == read_bandwidths(home).bandwidths
            assert service.status()["bandwidths"]["disk_bytes_per_s"] == body["bandwidths"]["disk_bytes_per_s"]

    run_in_virtual_time(main)

    again = runner.invoke(cli.app, [*args, "--no-save", "--home", str(tmp_path / "other")])
    assert again.exit_code == 0, again.output
    assert not (tmp_path / "other" / BANDWIDTHS_FILE).exists()
