"""What users hand us, checked where it enters: understanding items, image prompts and their per-item overrides.

Everything here needs no engine, so front ends can check input before an engine starts. A bad item raises
`ItemError` naming the item (and, for HTTP, the field); the call-level arguments raise `ValueError`/`TypeError`
naming the argument.
"""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .image_loading import MAX_ASPECT_RATIO, load_image  # noqa: F401 - re-exported: callers import them from here
from .prompts import DEFAULT_CFG_SCALE, NEGATIVE_PROMPT, POSITIVE_SUFFIX
from .protocol import ImageSpec
from .settings import (
    CALL_LEVEL,
    DEFAULT_SIDE,
    DEFAULT_TOP_K,
    PER_PROMPT,
    Prompt,
    Seed,
    SettingsError,
    Text,
    check_value,
    image_settings,
    show,
)

ImageLike = Any  # PIL.Image.Image, a path, or encoded bytes

# Per-prompt overrides a generation item (a dict, a JSON line, a parquet row) may carry besides "prompt".
OVERRIDES = PER_PROMPT


class ItemError(ValueError):
    """A problem with one input item; its message names the item, `field` the offending field if one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def text_value(value: Any, field: str, where: str, *, allow_empty: bool = False) -> str:
    """A text that is not an image setting (an understanding question), checked as the settings check theirs."""
    try:
        return check_value(Text if allow_empty else Prompt, value, field)
    except SettingsError as exc:
        raise ItemError(f"{where}: {exc}", field) from None


# --------------------------------------------------------------------------------------------------------------
# Text to image


@dataclass(frozen=True)
class GenerationDefaults:
    """The call-level settings every prompt gets unless it overrides them (see `OVERRIDES`); the defaults and
    bounds are `settings.ImageSettings`'."""

    height: int = DEFAULT_SIDE
    width: int = DEFAULT_SIDE
    cfg_scale: float = DEFAULT_CFG_SCALE
    negative_prompt: str = NEGATIVE_PROMPT
    positive_suffix: str = POSITIVE_SUFFIX
    top_k: int = DEFAULT_TOP_K
    temperature: float = 1.0

    def checked(self) -> GenerationDefaults:
        """The same settings, validated; a bad one raises ValueError naming the argument."""
        try:
            # A placeholder prompt: the call's settings are checked as any image's would be.
            settings = image_settings(prompt="-", **asdict(self))
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        return GenerationDefaults(**{name: getattr(settings, name) for name in CALL_LEVEL})


def image_spec(item: Any, *, where: str, defaults: GenerationDefaults, seed: Any) -> ImageSpec:
    """An `ImageSpec` from a prompt (a string or a dict with "prompt" and any of `OVERRIDES`).

    `seed` is the item's seed unless it carries its own. `defaults` must already be `checked()`.
    """
    if isinstance(item, ImageSpec):
        return item
    fields: dict[str, Any] = {**asdict(defaults), "seed": seed}
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"prompt", *OVERRIDES}, key=str)
        if unknown:
            raise ItemError(f"{where}: unknown keys {unknown}; allowed: {['prompt', *OVERRIDES]}", str(unknown[0]))
        if "prompt" not in item:
            raise ItemError(f"{where}: no 'prompt'", "prompt")
        fields.update(item)
    else:
        fields["prompt"] = item
    try:
        settings = image_settings(**fields)
    except SettingsError as exc:
        raise ItemError(f"{where}: {exc}", exc.field) from None
    h, w = settings.grid
    return ImageSpec(prompt=settings.prompt, h=h, w=w, cfg_scale=settings.cfg_scale, seed=settings.seed,
                     negative_prompt=settings.negative_prompt, positive_suffix=settings.positive_suffix,
                     top_k=settings.top_k, temperature=settings.temperature)


def image_specs(prompts: Iterable[Any], indices: Iterable[int] | None, seed: Any,
                defaults: GenerationDefaults) -> Iterator[tuple[int, Any, ImageSpec | ItemError]]:
    """(index, prompt, its spec or its error) for each prompt, lazily: a generator of prompts is never materialised.

    `indices` names the items (default 0, 1, ...), each a distinct integer >= 0: errors say `item {index}`.
    `seed`: None draws one per image, an int gives item `index` the seed `seed + index`, a sequence gives one seed
    per prompt, in order.
    """
    if isinstance(seed, bool) or not (seed is None or isinstance(seed, (numbers.Integral, list, tuple))):
        raise TypeError(f"seed must be None, an int or a list of ints, got {show(seed)}")
    if isinstance(seed, numbers.Integral):
        try:
            check_value(Seed, seed, "seed")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
    if isinstance(indices, (list, tuple, range)):  # checked whole before any work when it can be
        _check_indices(indices)
    seeds = iter(seed) if isinstance(seed, (list, tuple)) else None
    positions = iter(indices) if indices is not None else None
    seen: set[int] = set()
    for position, prompt in enumerate(prompts):
        index = position if positions is None else next(positions, None)
        if index is None:
            raise ValueError(f"got more prompts than indices ({position})")
        if positions is not None:
            _check_index(index, seen)
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


def _check_index(index: Any, seen: set[int]) -> None:
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
        raise ValueError(f"indices: each index must be an integer >= 0, got {show(index)}")
    if index in seen:
        raise ValueError(f"indices: {index} appears more than once; each image needs its own index")
    seen.add(int(index))


def _check_indices(indices) -> None:
    seen: set[int] = set()
    for index in indices:
        _check_index(index, seen)


def one_or_many(items: Any, single: tuple[type, ...]) -> Iterable[Any]:
    """A single item as a list of one, so a plain string is never iterated character by character."""
    return [items] if isinstance(items, single) else items


# --------------------------------------------------------------------------------------------------------------
# Understanding


@dataclass(frozen=True)
class UnderstandingItem:
    text: str
    images: tuple[Any, ...] = ()


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
