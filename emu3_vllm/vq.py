"""VQ decode of generated code grids to PIL images with transformers' own `Emu3VQVAE` (no copied model code).

Only the VQ-VAE's weights are read from the checkpoint, so decoding does not load the 8B text model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_VQ_PREFIXES = ("vqmodel.", "model.vqmodel.")


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


class VQDecoder:
    def __init__(self, checkpoint: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        from safetensors import safe_open
        from transformers import Emu3Config, Emu3ImageProcessor
        from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

        path = Path(checkpoint)
        config = Emu3Config.from_pretrained(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32
        self.vq = Emu3VQVAE(config.vq_config)
        state = {}
        for file in _checkpoint_files(path):
            with safe_open(str(file), "pt") as fh:
                for key in fh.keys():
                    for prefix in _VQ_PREFIXES:
                        if key.startswith(prefix):
                            state[key[len(prefix):]] = fh.get_tensor(key)
        missing, unexpected = self.vq.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"VQ weights missing from {path}: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.vq.to(device=self.device, dtype=self.dtype).eval()
        self.image_processor = Emu3ImageProcessor.from_pretrained(path)

    @torch.no_grad()
    def decode(self, grids: list[list[list[int]]]) -> list:
        """PIL images for (h, w) code grids; grids of one shape are decoded as one batch."""
        images: list = [None] * len(grids)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            by_shape.setdefault((len(grid), len(grid[0])), []).append(i)
        for idxs in by_shape.values():
            codes = torch.tensor([grids[i] for i in idxs], dtype=torch.long, device=self.device)
            pixels = self.vq.decode(codes).float().cpu()
            pil = self.image_processor.postprocess(list(pixels), return_tensors="PIL.Image.Image")["pixel_values"]
            for i, image in zip(idxs, pil):
                images[i] = image
        return images
