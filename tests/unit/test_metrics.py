"""``/metrics``: the names the docs give are the names exported, and a removed model leaves no series."""

from __future__ import annotations

import re
from pathlib import Path

from ember.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
METRIC_NAME = re.compile(r"\b((?:nv_inference|ember)_[a-z_]*[a-z])\b")


def _exercised() -> Metrics:
    """Every family with a series, as a served, refused and cold-started model leaves them."""
    m = Metrics()
    for family in (m.success, m.count, m.exec_count, m.request_us, m.queue_us, m.compute_us, m.pending):
        family.labels("m", "1").inc()
    m.failure.labels("m", "1", "DeadlineUnmeetable").inc()
    m.cold_starts.labels("m", "cool").inc()
    m.load_seconds.labels("cool").observe(0.1)
    m.set_tier("m", "hot")
    m.slo_met.labels("m").inc()
    m.slo_total.labels("m").inc()
    m.slo_attainment.labels("m").set(1.0)
    m.latency.labels("m").observe(0.01)
    return m


def _exported(text: str) -> set[str]:
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    samples = re.findall(r"^([a-z_]+)(?:\{| )", text, re.M)
    return set(types) | set(samples)


def test_every_metric_the_docs_name_is_exported_under_that_name() -> None:
    exported = _exported(_exercised().render().decode())
    for doc in ("docs/operations.md", "README.md", "docs/api.md"):
        named = set(METRIC_NAME.findall((ROOT / doc).read_text())) - {"ember_user"}
        assert named - exported == set(), doc


def test_tritons_request_duration_is_exported() -> None:
    text = _exercised().render().decode()
    assert "# TYPE nv_inference_request_duration_us counter" in text
    assert 'nv_inference_request_duration_us{model="m",version="1"} 1.0' in text


def test_a_forgotten_model_leaves_no_series_and_others_keep_theirs() -> None:
    m = _exercised()
    m.success.labels("other", "3").inc()
    m.slo_total.labels("other").inc()
    m.forget("m")
    text = m.render().decode()
    assert 'model="m"' not in text
    assert 'nv_inference_request_success{model="other",version="3"} 1.0' in text
    assert 'ember_slo_requests_total{model="other"} 1.0' in text
    m.success.labels("m", "2").inc()  # the name deployed again counts from zero
    assert 'nv_inference_request_success{model="m",version="2"} 1.0' in m.render().decode()
