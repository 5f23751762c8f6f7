"""emu3_vllm: BAAI Emu3 on vLLM.

Light at import: vLLM and torch load only when the engine or a checkpoint builder is used.
"""

from .checkpoints import make_random_checkpoint

__all__ = ["Emu3", "generate_on_ray", "make_random_checkpoint", "shapes_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Emu3":
        from .api import Emu3

        return Emu3
    if name == "generate_on_ray":  # needs Ray (the `ray` extra) only when called
        from .ray_generation import generate_on_ray

        return generate_on_ray
    if name == "shapes_checkpoint":
        from .checkpoints import shapes_checkpoint

        return shapes_checkpoint
    raise AttributeError(name)
