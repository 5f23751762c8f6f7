"""The shapes world (coloured circles, squares and triangles on white) and the tiny Emu3 trained on it, which ships
with the package: `emu3-vllm demo` shows it answering and drawing, and the tests score it."""

from emu3_vllm.shapes.trained import copy_shapes_checkpoint, shapes_checkpoint
from emu3_vllm.shapes.world import (
    BACKGROUND,
    COLOUR_QUESTION,
    DESCRIBE_QUESTION,
    IMAGE_SIZE,
    MAX_SIDE,
    MIN_SIDE,
    PALETTE,
    QUESTIONS,
    SHAPE_QUESTION,
    SHAPES,
    ShapeSample,
    all_captions,
    caption,
    classify,
    draw,
    fill_ratio,
    mask_centroid,
    non_white_mask,
    off_colour_share,
    psnr,
    sample,
    samples,
)

__all__ = [
    "BACKGROUND", "COLOUR_QUESTION", "DESCRIBE_QUESTION", "IMAGE_SIZE", "MAX_SIDE", "MIN_SIDE", "PALETTE",
    "QUESTIONS", "SHAPES", "SHAPE_QUESTION", "ShapeSample", "all_captions", "caption", "classify",
    "copy_shapes_checkpoint", "draw", "fill_ratio", "mask_centroid", "non_white_mask", "off_colour_share", "psnr",
    "sample", "samples", "shapes_checkpoint",
]
