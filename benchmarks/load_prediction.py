"""First-load prediction: the default link speeds against this host's measured ones, beside real loads.

    python benchmarks/load_prediction.py [--model-mb 400] [--bench-gb 0.5] [--repeats 2] [--json out.json]

Claim (docs/operations.md): until a model's own loads are measured, ``ember serve`` predicts its load
from the cool tier from the links ``ember store bench`` saved in ``HOME/bandwidths.json``, and that
prediction is closer to the real load than the one from ``Bandwidths()``'s defaults.

* Measured links: ``ember store bench``'s code (``run_benchmark``, best of 3, cold disk included) on
  a ``--bench-gb`` checkpoint under a fresh home, saved as the CLI saves them.
* Real loads: ``EmberService`` on that home (1 local worker, CPU) deploys a model holding
  ``--model-mb`` of fp16 weights (its ``setup`` only assigns them). Then ``--repeats`` times: demote
  it to cool, evict its file from the page cache, and time ``ensure_hot`` (the controller's own
  ``last_cold_start``); and again without evicting (cool, in the page cache).
* Predictions: ``Bandwidths.load_s(bytes, COOL)`` with the defaults and with the saved links. Each
  is printed beside the real load's median, with their ratio (real / predicted: 1 is exact, above 1
  the prediction was too fast and would admit requests that miss their SLO).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ember.bench.load import evict, run_benchmark
from ember.clock import WallClock
from ember.config import DeploySpec
from ember.policies.latency import Bandwidths
from ember.policies.tiers import Tier
from ember.service import EmberService, ServeOptions
from ember.store.bandwidths import BANDWIDTHS_FILE, measured_bandwidths, read_bandwidths, save_bandwidths

MODEL_CODE = """
import torch
from ember.api import ModelAPI, TensorSpec

class Big(ModelAPI):
    inputs = (TensorSpec("x", "FP32", (-1, 1)),)
    outputs = (TensorSpec("x", "FP32", (-1, 1)),)

    def source_weights(self):
        g = torch.Generator().manual_seed(0)
        return {f"w{i}": torch.randn(MIB16, generator=g).half() for i in range(COUNT)}

    def setup(self, weights, assets, device):
        self.weights = dict(weights)

    def predict(self, batch):
        return batch
"""


async def measure(home: Path, model_mb: int, repeats: int) -> dict[str, Any]:
    code = home / "big.py"
    code.write_text(MODEL_CODE.replace("MIB16", str(8 << 20)).replace("COUNT", str(max(1, model_mb // 16))))
    options = ServeOptions(home=home, workers=1, spare_workers=0, device="cpu")
    loads: dict[str, list[float]] = {"cold disk": [], "page cache": []}
    async with EmberService(options) as service:
        info = await service.deploy(
            DeploySpec.model_validate({"source": f"{code}:Big", "name": "big", "warmup": False})
        )
        for _ in range(repeats):
            for source in loads:
                await service.controller.demote("big", Tier.COOL)
                if source == "cold disk":
                    evict([service.store.weights_path(service.deployment("big").key)])
                await service.controller.ensure_hot("big")
                cold = service.controller.last_cold_start("big")
                assert cold is not None and cold.tier is Tier.COOL
                loads[source].append(cold.seconds)
                print(f"  cool ({source}) -> hot: {cold.seconds:.3f} s")
    return {"bytes": info.bytes, "loads_s": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-mb", type=int, default=400, help="the model's weights, MB")
    parser.add_argument("--bench-gb", type=float, default=0.5, help="the bench checkpoint, GB")
    parser.add_argument("--repeats", type=int, default=2, help="real loads from each source")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-load-prediction-") as folder:
        home = Path(folder)
        rows, notes = run_benchmark(args.bench_gb, 3, 4, True, workdir=home, say=print)
        links, sources = measured_bandwidths(rows, bool(notes.get("cuda")))
        save_bandwidths(home / BANDWIDTHS_FILE, links, sources, notes, WallClock().wall())
        saved = read_bandwidths(home)
        print(f"saved: {saved.describe()}")
        real = asyncio.run(measure(home, args.model_mb, args.repeats))
    size = real["bytes"]
    result: dict[str, Any] = {"bytes": size, "links": saved.to_json(), "loads_s": real["loads_s"], "rows": []}
    print(f"\nmodel {size / 1e6:.0f} MB, cool -> hot; real is the median of {args.repeats}")
    print(f"{'predicted with':<16} {'predicted s':>11} {'real source':>12} {'real s':>8} {'real/predicted':>15}")
    for label, bandwidths in (("defaults", Bandwidths()), ("measured links", saved.bandwidths)):
        predicted = bandwidths.load_s(size, Tier.COOL)
        for source, seconds in real["loads_s"].items():
            median = statistics.median(seconds)
            print(f"{label:<16} {predicted:>11.3f} {source:>12} {median:>8.3f} {median / predicted:>15.2f}")
            result["rows"].append(
                {"predicted_with": label, "predicted_s": predicted, "source": source, "real_s": median}
            )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
