"""emu3_vllm: BAAI Emu3 on vLLM.

Light at import: vLLM and torch load only when the engine or a checkpoint builder is used.
"""

from .checkpoints import make_random_checkpoint

__all__ = ["Emu3", "make_random_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Emu3":
        from .api import Emu3

        return Emu3
    raise AttributeError(name)
