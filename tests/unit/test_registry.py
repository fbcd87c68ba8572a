from __future__ import annotations

import pytest

from ember.errors import ModelExists, ModelNotFound
from ember.registry import Registry


def test_a_deployment_is_ready_only_once_finished(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    rec = reg.begin("m", {"source": "x"}, created_at=1.0)
    assert rec.version == 1 and rec.state == "importing" and rec.key == "m@1"
    with pytest.raises(ModelNotFound):
        reg.get("m")
    assert reg.all() == []
    done = reg.finish("m", {"bytes": 3})
    assert done.state == "ready" and done.metadata == {"bytes": 3} and done.spec == {"source": "x"}
    assert [r.name for r in reg.all()] == ["m"]


def test_names_are_unique_and_versions_never_reused(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.begin("m", {}, 1.0)
    with pytest.raises(ModelExists):
        reg.begin("m", {}, 2.0)
    reg.finish("m", {})
    reg.remove("m")
    assert reg.begin("m", {}, 3.0).version == 2
    reg.abort("m")
    assert reg.begin("m", {}, 4.0).version == 3


def test_everything_survives_a_reopen_and_half_imports_are_recovered(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.begin("a", {"slo_ms": 5}, 1.0)
    reg.finish("a", {"k": "v"})
    reg.begin("b", {}, 2.0)  # a crash happens before finish
    reg.close()
    again = Registry(tmp_path / "r.sqlite")
    assert [r.name for r in again.recover()] == ["b"]
    assert again.recover() == []
    (a,) = again.all()
    assert a.spec == {"slo_ms": 5} and a.metadata == {"k": "v"}
    assert again.begin("b", {}, 3.0).version == 2


def test_removing_an_unknown_model_says_so(tmp_path):
    with pytest.raises(ModelNotFound, match="ember ls"):
        Registry(tmp_path / "r.sqlite").remove("ghost")


def test_measured_times_are_kept_with_the_deployment_and_go_with_it(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    rec = reg.begin("m", {"slo_ms": 20}, 1.0)
    reg.finish("m", {})
    assert reg.latency(rec.key) == {}
    reg.save_latency(rec.key, {"batches": {"0": [0.01]}}, 2.0)
    reg.close()
    again = Registry(tmp_path / "r.sqlite")
    assert again.latency(rec.key) == {"batches": {"0": [0.01]}}
    again.remove("m")
    assert again.latency(rec.key) == {}


def test_a_spec_changes_in_place_and_keeps_its_version(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.begin("m", {"slo_ms": 20, "source": "x"}, 1.0)
    reg.finish("m", {})
    changed = reg.update_spec("m", {"slo_ms": 250})
    assert changed.spec == {"slo_ms": 250, "source": "x"} and changed.version == 1
    with pytest.raises(ModelNotFound):
        reg.update_spec("nope", {"slo_ms": 1})
