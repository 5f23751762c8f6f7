"""What users hand us, checked where it enters: understanding items, image prompts and their per-item overrides.

Everything here needs no engine, so front ends can check input before an engine starts. A bad item raises
`ItemError` naming the item (and, for HTTP, the field); the call-level arguments raise `ValueError`/`TypeError`
naming the argument.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .layout import SPATIAL_FACTOR, pixels_to_grid, pixels_to_tokens
from .prompts import DEFAULT_CFG_SCALE, NEGATIVE_PROMPT, POSITIVE_SUFFIX
from .protocol import ImageSpec

ImageLike = Any  # PIL.Image.Image, a path, or encoded bytes
MAX_ASPECT_RATIO = 200  # transformers' Emu3 `smart_resize` refuses longer/shorter side ratios beyond this

# Per-prompt overrides a generation item (a dict, a JSON line, a parquet row) may carry besides "prompt".
OVERRIDES = ("height", "width", "cfg_scale", "seed", "negative_prompt")


class ItemError(ValueError):
    """A problem with one input item; its message names the item, `field` the offending field if one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------------------------------------------
# Values


def text_value(value: Any, field: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ItemError(f"{where}: {field} must be a string, got {_show(value)}", field)
    if not allow_empty and not value.strip():
        raise ItemError(f"{where}: {field} is empty", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ItemError(f"{where}: {field} is not valid Unicode text ({exc.reason} at character {exc.start})",
                        field) from exc
    return value


def integer_value(value: Any, field: str, where: str, *, minimum: int | None = None) -> int:
    """An int (integral floats such as 64.0 from JSON count; 1.7, "3", True and None do not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            not isinstance(value, numbers.Integral) and not float(value).is_integer()):
        raise ItemError(f"{where}: {field} must be an integer, got {_show(value)}", field)
    value = int(value)
    if minimum is not None and value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ItemError(f"{where}: {field} must be {bound}, got {value}", field)
    return value


def number_value(value: Any, field: str, where: str, *, positive: bool = False, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ItemError(f"{where}: {field} must be a finite number, got {_show(value)}", field)
    value = float(value)
    if positive and value <= 0:
        raise ItemError(f"{where}: {field} must be a finite number > 0, got {value!r}", field)
    if minimum is not None and value < minimum:
        raise ItemError(f"{where}: {field} must be >= {minimum}, got {value!r}", field)
    return value


def image_grid(height: Any, width: Any, where: str) -> tuple[int, int]:
    """Token grid (rows, columns) for a pixel size; see `layout.pixels_to_grid` for the rounding rule."""
    height = integer_value(height, "height", where, minimum=1)
    width = integer_value(width, "width", where, minimum=1)
    for field, value in (("height", height), ("width", width)):
        if pixels_to_tokens(value) < 1:
            raise ItemError(f"{where}: {field} {value} is below one {SPATIAL_FACTOR}-pixel token (the smallest side "
                            f"is {SPATIAL_FACTOR // 2} pixels, rounded up to {SPATIAL_FACTOR})", field)
    return pixels_to_grid(height, width)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------------------
# Text to image


@dataclass(frozen=True)
class GenerationDefaults:
    """The call-level settings every prompt gets unless it overrides them (see `OVERRIDES`)."""

    height: int = 720
    width: int = 720
    cfg_scale: float = DEFAULT_CFG_SCALE
    negative_prompt: str = NEGATIVE_PROMPT
    positive_suffix: str = POSITIVE_SUFFIX
    top_k: int = 2048
    temperature: float = 1.0

    def checked(self) -> "GenerationDefaults":
        """The same settings, validated; a bad one raises ValueError naming the argument."""
        where = "argument"
        try:
            image_grid(self.height, self.width, where)
            return replace(
                self,
                cfg_scale=number_value(self.cfg_scale, "cfg_scale", where, positive=True),
                negative_prompt=text_value(self.negative_prompt, "negative_prompt", where, allow_empty=True),
                positive_suffix=text_value(self.positive_suffix, "positive_suffix", where, allow_empty=True),
                top_k=integer_value(self.top_k, "top_k", where),
                temperature=number_value(self.temperature, "temperature", where, minimum=0.0),
            )
        except ItemError as exc:
            raise ValueError(str(exc).replace("argument: ", "", 1)) from exc


def image_spec(item: Any, *, where: str, defaults: GenerationDefaults, seed: int) -> ImageSpec:
    """An `ImageSpec` from a prompt (a string or a dict with "prompt" and any of `OVERRIDES`).

    `seed` is the item's seed unless it carries its own. `defaults` must already be `checked()`.
    """
    if isinstance(item, ImageSpec):
        return item
    fields: dict[str, Any] = {"height": defaults.height, "width": defaults.width, "cfg_scale": defaults.cfg_scale,
                              "seed": seed, "negative_prompt": defaults.negative_prompt}
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"prompt", *OVERRIDES}, key=str)
        if unknown:
            raise ItemError(f"{where}: unknown keys {unknown}; allowed: {['prompt', *OVERRIDES]}", str(unknown[0]))
        if "prompt" not in item:
            raise ItemError(f"{where}: no 'prompt'", "prompt")
        fields.update(item)
        prompt = item["prompt"]
    else:
        prompt = item
    h, w = image_grid(fields["height"], fields["width"], where)
    return ImageSpec(
        prompt=text_value(prompt, "prompt", where),
        h=h, w=w,
        cfg_scale=number_value(fields["cfg_scale"], "cfg_scale", where, positive=True),
        seed=integer_value(fields["seed"], "seed", where),
        negative_prompt=text_value(fields["negative_prompt"], "negative_prompt", where, allow_empty=True),
        positive_suffix=defaults.positive_suffix, top_k=defaults.top_k, temperature=defaults.temperature,
    )


def image_specs(prompts: Iterable[Any], indices: Iterable[int] | None, seed: Any,
                defaults: GenerationDefaults) -> Iterator[tuple[int, Any, ImageSpec | ItemError]]:
    """(index, prompt, its spec or its error) for each prompt, lazily: a generator of prompts is never materialised.

    `indices` names the items (default 0, 1, ...); errors say `item {index}`. `seed`: None draws one per image, an
    int gives item `index` the seed `seed + index`, a sequence gives one seed per prompt, in order.
    """
    if isinstance(seed, bool) or not (seed is None or isinstance(seed, (numbers.Integral, list, tuple))):
        raise TypeError(f"seed must be None, an int or a list of ints, got {_show(seed)}")
    seeds = iter(seed) if isinstance(seed, (list, tuple)) else None
    positions = iter(indices) if indices is not None else None
    for position, prompt in enumerate(prompts):
        index = position if positions is None else next(positions, None)
        if index is None:
            raise ValueError(f"got more prompts than indices ({position})")
        if seeds is not None:
            item_seed = next(seeds, None)
            if item_seed is None:
                raise ValueError(f"got {position} seeds for more prompts")
        elif seed is None:
            item_seed = secrets.randbits(31)
        else:
            item_seed = int(seed) + index
        try:
            yield index, prompt, image_spec(prompt, where=f"item {index}", defaults=defaults, seed=item_seed)
        except ItemError as exc:
            yield index, prompt, exc
    if seeds is not None and next(seeds, None) is not None:
        raise ValueError("got more seeds than prompts")


def one_or_many(items: Any, single: tuple[type, ...]) -> Iterable[Any]:
    """A single item as a list of one, so a plain string is never iterated character by character."""
    return [items] if isinstance(items, single) else items


# --------------------------------------------------------------------------------------------------------------
# Understanding


@dataclass(frozen=True)
class UnderstandingItem:
    text: str
    images: tuple[Any, ...] = ()


def load_image(image: ImageLike, where: str):
    """An RGB PIL image from a PIL image, a path or bytes, fully decoded so corrupt data fails here."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, (str, os.PathLike)):
            img = Image.open(Path(image))
        elif isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        else:
            raise ItemError(f"{where}: expected a PIL image, a path or bytes, got {type(image).__name__}")
        img.load()
    except ItemError:
        raise
    except Exception as exc:  # PIL raises many types for undecodable data
        raise ItemError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if img.width == 0 or img.height == 0:
        raise ItemError(f"{where}: image has zero size ({img.width}x{img.height})")
    ratio = max(img.width, img.height) / min(img.width, img.height)
    if ratio > MAX_ASPECT_RATIO:
        raise ItemError(f"{where}: image is {img.width}x{img.height}, an aspect ratio of {ratio:g}; Emu3's image "
                        f"processor takes at most {MAX_ASPECT_RATIO}")
    return img.convert("RGB") if img.mode != "RGB" else img


def understanding_item(item: Any, where: str) -> UnderstandingItem:
    """Accept `text`, `(text, images)` or `{"text": ..., "images": [...]}`; a single image need not be a list."""
    if isinstance(item, UnderstandingItem):
        text, images = item.text, item.images
    elif isinstance(item, str):
        text, images = item, ()
    elif isinstance(item, dict):
        unknown = sorted(set(item) - {"text", "images", "image", "prompt"}, key=str)
        if unknown:
            raise ItemError(f"{where}: unknown keys {unknown}; use 'text' and 'images'", str(unknown[0]))
        text = item.get("text", item.get("prompt"))
        images = item.get("images", item.get("image", ()))
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        text, images = item
    else:
        raise ItemError(f"{where}: expected a text, (text, images) or a dict with 'text' and 'images', "
                        f"got {type(item).__name__}")
    text = text_value(text, "text", where, allow_empty=True)
    if images is None:
        images = ()
    elif not isinstance(images, (list, tuple)):
        images = (images,)
    return UnderstandingItem(text=text, images=tuple(images))
