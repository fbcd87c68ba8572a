"""The public API is small, decided in one place, and importing it stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ember
from ember.worker.host import ModelHost

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_and_every_name_resolves():
    assert ember.__all__ == sorted(ember.__all__)
    for name in ember.__all__:
        assert getattr(ember, name) is not None, name


def test_the_generative_contract_is_public():
    assert {"GenerativeModel", "SeqChunk", "ModelAPI"} <= set(ember.__all__)
    assert issubclass(ember.GenerativeModel, ember.ModelAPI)
    assert ember.GenerativeModel.task == "generate"


def test_the_gateway_side_never_imports_torch():
    code = "import sys, ember, ember.gateway.app, ember.service, ember.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_importing_the_policies_imports_no_storage_or_worker_code():
    code = "import sys, ember.policies; print(sorted(m for m in sys.modules if m.startswith(('ember.st', 'ember.wo'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_readme_model_runs_as_the_platform_runs_it(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class Linear" in b)
    (tmp_path / "readme_model.py").write_text(block)
    ref = f"{tmp_path / 'readme_model.py'}:Linear"
    # Deploy time imports into a staging folder; load time builds from the stored checkpoint.
    host = ModelHost(torch.device("cpu"))
    (tmp_path / "staging").mkdir()
    described = host.import_model(ref, {}, tmp_path / "staging")
    assert described["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    host.load("linear@1", ref, {}, tmp_path / "staging" / "weights.ember", {})
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    batch = host.infer("linear@1", [{"x": x[:1]}, {"x": x[1:]}])
    torch.manual_seed(0)
    expected = torch.nn.Linear(16, 16)(torch.from_numpy(x)).detach().numpy()
    got = np.concatenate([out["y"] for out in batch.outputs if not isinstance(out, str)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_talking_to_a_worker_does_not_import_torch_into_the_gateway(tmp_path):
    code = f"""
import asyncio, sys
from pathlib import Path
from ember.cluster.local import LocalBackend

async def main():
    backend = LocalBackend(1, Path({str(tmp_path)!r}), preload=())
    await backend.start()
    try:
        print(backend.workers()[0].ready_info.torch_version, "torch" in sys.modules)
    finally:
        await backend.stop()

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    version, imported = out.stdout.split()
    assert version == torch.__version__ and imported == "False"
