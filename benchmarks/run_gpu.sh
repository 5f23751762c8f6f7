#!/usr/bin/env bash
# GPU checks and 8B benchmarks on one NVIDIA GPU, in one command (see benchmarks/README.md).
#   bash benchmarks/run_gpu.sh [all|setup|tests|generation|understanding]
# Environment: PYTHON (default python3), OUT (default benchmarks/results), WORK (default /tmp/emu3-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-all}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/emu3-bench}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# An offline install (below) lives in $WORK/site; every step needs it on the path.
if [ -d "$WORK/site" ]; then export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"; fi

setup() {
  if [ -d .whl ]; then  # offline: wheels carried beside the repository, emu3_vllm's own among them
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" .whl/*.whl
    case ":${PYTHONPATH:-}:" in *":$WORK/site:"*) ;; *) export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  else
    "$PY" -m pip install -q -e ".[gpu,test]"
  fi
  "$PY" -c "import torch, vllm, transformers; print('torch', torch.__version__, '| vllm', vllm.__version__,
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name(0))"
}

gpu_tests() {
  # The Triton kernel against its reference on CUDA, the V2 adapter, and end-to-end generation on the GPU.
  "$PY" -m pytest -q -x tests/test_cfg_kernel.py tests/test_cfg_processor_v2.py tests/test_generation.py \
    tests/test_lockstep.py 2>&1 | tee "$OUT/gpu_tests.log"
}

generation() {
  "$PY" benchmarks/bench_generation.py --size 8b --workdir "$WORK" --height 720 --width 720 --num-images 32 \
    --repeats 1 --hf-images 1 --hf-max-tokens 256 \
    --out "$OUT/generation_gpu_8b.json" 2>&1 | tee "$OUT/generation_gpu_8b.log"
  # FP8 KV cache against the bf16 one at the same KV bytes: at 720x720 a pair holds 2 x 8,193 generated tokens,
  # and the cache, not compute, caps how many images run at once.
  "$PY" benchmarks/bench_generation.py --size 8b --workdir "$WORK" --dtype bfloat16 --height 720 --width 720 \
    --num-images 64 --repeats 1 --kv-cache-dtype fp8 \
    --out "$OUT/generation_gpu_8b_fp8.json" 2>&1 | tee "$OUT/generation_gpu_8b_fp8.log"
}

understanding() {
  "$PY" benchmarks/bench_understanding.py --size 8b --workdir "$WORK" --num-prompts 64 --image-size 512 \
    --max-new-tokens 128 --repeats 1 --hf-prompts 4 \
    --out "$OUT/understanding_gpu_8b.json" 2>&1 | tee "$OUT/understanding_gpu_8b.log"
}

case "$STEP" in
  all) setup; gpu_tests; generation; understanding ;;
  setup) setup ;;
  tests) gpu_tests ;;
  generation) generation ;;
  understanding) understanding ;;
  *) echo "unknown step $STEP: use all, setup, tests, generation or understanding" >&2; exit 2 ;;
esac
