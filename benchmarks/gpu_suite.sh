#!/usr/bin/env bash
# The GPU host's checks and measurements in one run: tests/gpu, then each GPU benchmark with its
# ceiling or baseline measured in the same run. Every step writes its --json into OUT and runs under
# its own time limit; a step that fails is reported and the next one still runs. The exit status is
# the number of failed steps.
#
#   OUT=/tmp/ember-gpu benchmarks/gpu_suite.sh            # on a CUDA host, from the repository root
#   QUICK=1 OUT=/tmp/ember-gpu benchmarks/gpu_suite.sh    # the same steps at toy sizes (checks the script on a CPU)
#   STEPS="tests load" benchmarks/gpu_suite.sh             # only these: tests load resnet decoder warm compressed generate
#   LOAD_FLAGS=--no-cold benchmarks/gpu_suite.sh           # extra flags for benchmarks/load.py
#
# Python packages Ember needs beyond those the host has may lie as wheels in .whl/: they are
# installed into a scratch folder first (a GPU host here reaches no package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ember-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ember-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/ember-site"
fi

if [ -n "${QUICK:-}" ]; then
  device=cpu; size=0.05; resnet=resnet-tiny; decoder=decoder-tiny; arena_mb=256; llm=tiny
  llm_flags=(--rates 1,2 --duration-s 6)
else
  device=cuda; size=1; resnet=resnet50; decoder=decoder-1b; arena_mb=4096; llm=decoder-1b
  llm_flags=(--rates 2,4,8,16 --duration-s 20 --prompt-scale 0.5 --output-scale 0.5 --max-output 256
    --ttft-slo-ms 1000 --tpot-slo-ms 100 --max-num-seqs 64)
fi
failed=0
steps=" ${STEPS:-tests load resnet decoder warm compressed generate} "
step() {  # step KEY NAME LIMIT_S COMMAND...: run it if STEPS names KEY, say how it ended
  local key=$1 name=$2 limit=$3
  shift 3
  [[ "$steps" == *" $key "* ]] || return 0
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

echo "=== host"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
echo "cpus $(nproc)"; free -g | head -2; df -h /dev/shm "${TMPDIR:-/tmp}" | tail -2

step tests "tests/gpu" 120 "$PY" -m pytest -q -p no:cacheprovider tests/gpu
step load "load" 170 "$PY" benchmarks/load.py --size-gb "$size" --repeat 2 --threads 8 --no-compressed \
  ${LOAD_FLAGS:-} --json "$OUT/load.json"
step resnet "cold start $resnet" 120 "$PY" benchmarks/cold_start.py --model "$resnet" --device "$device" \
  --repeats 3 --baseline-repeats 2 --settle-s 1 --json "$OUT/cold_start_$resnet.json"
step decoder "cold start $decoder" 150 "$PY" benchmarks/cold_start.py --model "$decoder" --device "$device" \
  --repeats 3 --baseline-repeats 2 --settle-s 1 --warm-budget-mb "$arena_mb" --json "$OUT/cold_start_$decoder.json"
step warm "warm path" 75 "$PY" benchmarks/warm_path.py --device "$device" --duration-s 3 --rounds 2 \
  --hop-iterations 500 --json "$OUT/warm_path.json"
step compressed "compressed tier" 110 "$PY" benchmarks/load.py --size-gb "$size" --repeat 2 --threads "$(nproc)" \
  --compressed-only --json "$OUT/load_compressed.json"
# generate: SmolLM2's tokenizer travels in .gencache/tokenizer (benchmarks/generate.py keeps it apart)
step generate "generate $llm" 300 "$PY" benchmarks/generate.py --model "$llm" --device "$device" "${llm_flags[@]}" \
  --cache-dir "${GENCACHE:-.gencache}" --json "$OUT/generate.json"
echo "=== done: $failed step(s) failed"
exit "$failed"
