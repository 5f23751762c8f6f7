"""The trained shapes checkpoint that ships inside the package (`checkpoint/`, package data).

A tiny Emu3 (VQ-VAE and text decoder) trained on the shapes world (`world`) by `scripts/train_shapes.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

SHAPES_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def shapes_checkpoint() -> Path:
    """The directory of the trained shapes checkpoint that ships with the package.

    A tiny Emu3 (VQ-VAE and text decoder) trained on the world of `emu3_vllm.shapes.world`: it answers questions about
    those images and draws them. transformers and emu3_vllm load it like any Emu3 checkpoint.
    """
    if not (SHAPES_CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the shapes checkpoint is missing from {SHAPES_CHECKPOINT_DIR}; "
                                "reinstall emu3_vllm or rebuild it with scripts/train_shapes.py")
    return SHAPES_CHECKPOINT_DIR


def copy_shapes_checkpoint(path: str | os.PathLike) -> Path:
    """Copy the shipped shapes checkpoint to `path` (created if needed) and return it."""
    import shutil

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for file in shapes_checkpoint().iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)
    return out
