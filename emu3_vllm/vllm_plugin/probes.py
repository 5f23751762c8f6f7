"""Functions that run on the model inside vLLM's worker processes (via `LLM.apply_model`).

They live in an importable module so they pickle by reference into the workers.
"""

from __future__ import annotations

import torch


def model_class_path(model: torch.nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


class ImageTokenProbe:
    """Runs the engine model's VQ encoder on preprocessed pixels; returns token ids per image."""

    def __init__(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor):
        self.pixel_values = pixel_values
        self.image_sizes = image_sizes

    def __call__(self, model: torch.nn.Module) -> list[list[int]]:
        device = model.code_to_token_id.device
        dtype = next(model.vqmodel.parameters()).dtype
        pixels = [p.to(device=device, dtype=dtype) for p in self.pixel_values]
        grids = model.encode_images(pixels, self.image_sizes.reshape(-1, 2))
        return [model.image_token_ids(g).cpu().tolist() for g in grids]
