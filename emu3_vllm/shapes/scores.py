"""What a checkpoint of the shapes world scores, judged on fresh samples by the world's pixel classifier.

One function per skill, each on an open `Emu3` engine: drawing (colour, shape and off-colour share of the
drawings for the 18 captions), understanding (the three questions about fresh pictures), the VQ round trip and
visual chain of thought (draw, then ask what was drawn). `tests/test_shapes.py` holds the checkpoint to bars on
these numbers and `scripts/score_shapes.py` prints them for several seed sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from emu3_vllm.layout import parse_image_tokens
from emu3_vllm.shapes.world import (
    COLOUR_QUESTION,
    IMAGE_SIZE,
    QUESTIONS,
    all_captions,
    classify,
    mask_centroid,
    non_white_mask,
    off_colour_share,
    psnr,
    samples,
)

GRID = IMAGE_SIZE // 8
DRAWINGS_PER_CAPTION = 4
UNDERSTANDING_PICTURES = 60
ROUND_TRIP_PICTURES = 24


@dataclass(frozen=True)
class SeedSet:
    """The seeds of one scoring run, all derived from `base`: caption i's j-th drawing uses `base + 1000 * j + i`;
    understanding, the round trip and visual CoT draw their pictures from their own offsets."""

    base: int

    @property
    def drawing_bases(self) -> tuple[int, ...]:
        return tuple(self.base + 1000 * j for j in range(DRAWINGS_PER_CAPTION))

    @property
    def understanding(self) -> int:
        return self.base + 5000

    @property
    def round_trip(self) -> int:
        return self.base + 6000

    @property
    def visual_cot(self) -> int:
        return self.base + 7000


def draw(engine, captions: list[str], seeds: list[int], cfg_scale: float, **settings: Any) -> list:
    """One 64x64 drawing per caption with its seed; every result must be an image."""
    results = engine.generate_images(captions, height=IMAGE_SIZE, width=IMAGE_SIZE, cfg_scale=cfg_scale,
                                     seed=list(seeds), use_tqdm=False, **settings)
    for result in results:
        if result.error is not None:
            raise AssertionError(f"drawing {result.prompt!r} failed: {result.error}")
    return results


def drawing_scores(images: list, captions: list[str]) -> dict[str, float]:
    """colour and shape: the share of drawings the classifier reads as their caption's; off_colour: the mean, over
    drawings, of the share of a drawing's shape pixels whose nearest palette colour is not the caption's."""
    read = [classify(image) for image in images]
    wanted = [caption.split()[1:] for caption in captions]
    return {
        "colour": float(np.mean([c == colour for (c, _), (colour, _) in zip(read, wanted)])),
        "shape": float(np.mean([s == shape for (_, s), (_, shape) in zip(read, wanted)])),
        "off_colour": float(np.mean([off_colour_share(image, colour) for image, (colour, _) in zip(images, wanted)])),
    }


def drawing_seeds(seed_sets: tuple[int, ...]) -> tuple[list[str], list[int]]:
    """The 18 captions once per seed set, caption i drawn with seed `base + i`."""
    captions = all_captions()
    return captions * len(seed_sets), [base + i for base in seed_sets for i in range(len(captions))]


def score_drawing(engine, seed_sets: tuple[int, ...], cfg_scale: float, **settings: Any) -> dict[str, float]:
    captions, seeds = drawing_seeds(seed_sets)
    return drawing_scores([r.image for r in draw(engine, captions, seeds, cfg_scale, **settings)], captions)


def ask(engine, images: list, question: str) -> list[str]:
    answers = engine.understand([(question, [image]) for image in images], max_new_tokens=24, use_tqdm=False)
    for answer in answers:
        if answer.error is not None:
            raise AssertionError(f"asking {question!r} failed: {answer.error}")
    return [answer.strip() for answer in answers]


def score_understanding(engine, count: int, seed: int) -> dict[str, float]:
    """Exact-answer accuracy per question on `count` fresh pictures."""
    fresh = samples(count, seed=seed)
    images = [s.image() for s in fresh]
    return {question: float(np.mean([a == s.answer(question) for a, s in zip(ask(engine, images, question), fresh)]))
            for question in QUESTIONS}


def code_grids(engine, token_rows: list[list[int]]) -> list[list[list[int]]]:
    """(h, w) code grids from the visual-token ids (with end-of-line columns) the engine's VQ encoder gave: the
    generated-image layout without its closing tokens."""
    ids = engine.token_ids
    return [parse_image_tokens([*row, ids.eof, ids.eoi, ids.eos], GRID, GRID, ids) for row in token_rows]


def score_round_trip(engine, count: int, seed: int) -> dict[str, float]:
    """The engine's VQ encoder, then the VQ decoder, on `count` fresh pictures: PSNR (mean and worst) and how far
    the shape's centre moved at most (px)."""
    originals = [s.image() for s in samples(count, seed=seed)]
    decoded = engine.decode_images(code_grids(engine, [engine.image_tokens([image])[0] for image in originals]))
    values = [psnr(a, b) for a, b in zip(originals, decoded)]
    moved = [math.dist(mask_centroid(non_white_mask(a)), mask_centroid(non_white_mask(b)))
             for a, b in zip(originals, decoded)]
    return {"psnr_mean": float(np.mean(values)), "psnr_min": float(min(values)), "centroid_shift_max": max(moved)}


def score_visual_cot(engine, seed: int, cfg_scale: float = 3.0) -> float:
    """Draw each caption, then ask the drawing's colour: the share answered with the caption's colour."""
    captions = all_captions()
    drawn = draw(engine, captions, [seed + i for i in range(len(captions))], cfg_scale)
    answers = ask(engine, [r.image for r in drawn], COLOUR_QUESTION)
    return float(np.mean([a == caption.split()[1] for a, caption in zip(answers, captions)]))


def score_all(engine, seeds: SeedSet, scales: tuple[float, ...] = (1.0, 3.0, 5.0)) -> dict[str, Any]:
    """Every score on one seed set: drawing per CFG scale, understanding, round trip, visual CoT."""
    return {
        "seed_base": seeds.base,
        "drawing": {f"cfg{scale:g}": score_drawing(engine, seeds.drawing_bases, scale) for scale in scales},
        "understanding": score_understanding(engine, UNDERSTANDING_PICTURES, seeds.understanding),
        "round_trip": score_round_trip(engine, ROUND_TRIP_PICTURES, seeds.round_trip),
        "visual_cot": score_visual_cot(engine, seeds.visual_cot),
    }
