"""Fused GPU kernels, each beside the plain torch reference that defines it and runs on CPU.

Installed as `emu3_vllm.kernels` (not a top-level `kernels` package, a name another PyPI project owns).
"""

from .cfg_sample import cfg_sample, cfg_sample_reference, cfg_sample_triton, pair_key, triton_available

__all__ = ["cfg_sample", "cfg_sample_reference", "cfg_sample_triton", "pair_key", "triton_available"]
