"""The tiny random checkpoints' shapes, the settings of the tests' in-process engines, and random pictures."""

from __future__ import annotations

import numpy as np

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


def needs_fp8_kv(test):
    """Skips `test` where vLLM cannot hold an FP8 KV cache on this CPU (no AVX-512 or AMX); there the front ends'
    one-line refusal is what `test_settings.py` checks."""
    import pytest

    from emu3_vllm.engine import cpu_holds_fp8_kv, on_cpu

    return pytest.mark.skipif(on_cpu() and not cpu_holds_fp8_kv(),
                              reason="vLLM keeps an FP8 KV cache on a CPU only with AVX-512 or AMX")(test)


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
