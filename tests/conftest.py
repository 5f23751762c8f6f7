"""Shared fixtures: tiny random Emu3 checkpoints, one vLLM engine per checkpoint for the whole session, and
transformers' Emu3 on the same weights as the reference."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Small CPU KV cache: the tiny models need a few MB; keep the engines from reserving the default 4 GiB each.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Lets tests run probe functions on the model inside the engine's worker (LLM.apply_model).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

# Two tiny shapes that differ in every axis the model code depends on.
TINY_SHAPES = {
    "a": dict(),
    "b": dict(hidden_size=192, intermediate_size=320, num_hidden_layers=3, num_attention_heads=3,
              num_key_value_heads=1, codebook_size=300, base_channels=64, seed=1),
}

ENGINE_KWARGS = dict(dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=16)
try:  # on a GPU several tiny engines share the card; vLLM would otherwise reserve 90 % of it for each
    import torch

    if torch.cuda.is_available():
        ENGINE_KWARGS["gpu_memory_utilization"] = 0.08
except ImportError:  # pragma: no cover
    pass


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from emu3_vllm import make_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, overrides in TINY_SHAPES.items():
        overrides = dict(overrides)
        seed = overrides.pop("seed", 0)
        out[name] = str(make_random_checkpoint(root / name, size="tiny", seed=seed, **overrides))
    return out


@pytest.fixture(scope="session")
def engine_factory(checkpoints):
    """One `Emu3` engine per tiny shape for the whole session (engine start on CPU costs ~40 s)."""
    from emu3_vllm import Emu3

    engines = {}

    def get(name: str):
        if name not in engines:
            engines[name] = Emu3(checkpoints[name], **ENGINE_KWARGS)
        return engines[name]

    yield get
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="session")
def hf_factory(checkpoints):
    """transformers' Emu3ForConditionalGeneration + Emu3Processor on the same weights, fp32."""
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    cache = {}

    def get(name: str):
        if name not in cache:
            path = checkpoints[name]
            model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            cache[name] = (model, Emu3Processor.from_pretrained(path))
        return cache[name]

    return get
