"""What users hand us, checked where it enters: understanding items, image prompts and their per-item overrides.

Everything here needs no engine, so front ends can check input before an engine starts. A bad item raises
`ItemError` naming the item (and, for HTTP, the field); the call-level arguments raise `ValueError`/`TypeError`
naming the argument.
"""

from __future__ import annotations

import numbers
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from emu3_vllm.cfg_pairs import ImageSpec
from emu3_vllm.image_loading import MAX_ASPECT_RATIO, load_image  # noqa: F401 - re-exported: callers import them from here
from emu3_vllm.settings import (
    CALL_LEVEL,
    PER_PROMPT,
    ImageSettings,
    Prompt,
    Seed,
    SettingsError,
    Text,
    check_value,
    field_kind,
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


class _CallSettings:
    """The methods of `GenerationDefaults`; its fields are made from the settings model below."""

    @staticmethod
    def fields() -> tuple[str, ...]:
        return CALL_LEVEL

    @classmethod
    def of(cls, settings: dict[str, Any]) -> GenerationDefaults:
        """Checked defaults from keyword arguments; a name that is not an image setting is a TypeError."""
        unknown = sorted(set(settings) - set(CALL_LEVEL))
        if unknown:
            raise TypeError(f"unknown image setting {unknown[0]!r}; the settings are {', '.join(CALL_LEVEL)}")
        return cls(**settings).checked()

    def checked(self) -> GenerationDefaults:
        """The same settings, validated; a bad one raises ValueError naming the argument."""
        try:
            # A placeholder prompt: the call's settings are checked as any image's would be.
            settings = image_settings(prompt="-", **asdict(self))
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        return type(self)(**{name: getattr(settings, name) for name in CALL_LEVEL})


# The call-level settings every prompt gets unless it overrides them (see `OVERRIDES`): a frozen dataclass whose
# fields, types and defaults are `settings.ImageSettings`' (`CALL_LEVEL`), so no list of them is written here.
GenerationDefaults = make_dataclass(
    "GenerationDefaults",
    [(name, field_kind(name), field(default=ImageSettings.model_fields[name].default)) for name in CALL_LEVEL],
    bases=(_CallSettings,), frozen=True)
GenerationDefaults.__module__ = __name__  # for pickling (Ray) and reprs


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


# --------------------------------------------------------------------------------------------------------------
# What the engine and the model can take


@dataclass(frozen=True)
class EngineLimits:
    """What an image must fit in, read from a running engine's config."""

    max_model_len: int
    kv_blocks: int | None
    block_size: int
    max_batched_tokens: int
    max_num_seqs: int
    pair_scheduler: bool

    @classmethod
    def of(cls, vllm_config) -> EngineLimits:
        scheduler_cls = vllm_config.scheduler_config.scheduler_cls
        name = str(getattr(scheduler_cls, "__name__", scheduler_cls))
        return cls(max_model_len=vllm_config.model_config.max_model_len,
                   kv_blocks=vllm_config.cache_config.num_gpu_blocks,
                   block_size=vllm_config.cache_config.block_size,
                   max_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
                   max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
                   pair_scheduler="PairAware" in name)

    def check_image(self, where: str, cond_len: int, uncond_len: int, num_tokens: int, height: int,
                    width: int, *, bare_len: int = 0) -> None:
        """An `ItemError` if a CFG pair with these prompt lengths can never run on this engine, naming what to
        change: `size` only when the image cannot fit even after prompts of `bare_len` tokens (a prompt with no
        text: BOS and the image header), else the longer of `prompt` and `negative_prompt`."""
        from vllm.utils.math_utils import cdiv

        def blocks(cond: int, uncond: int) -> int:
            return cdiv(cond + num_tokens, self.block_size) + cdiv(uncond + num_tokens, self.block_size)

        # The halves share the image; whichever prompt is longer is the one that does not fit.
        longer = ("prompt", cond_len) if cond_len >= uncond_len else ("negative_prompt", uncond_len)
        image = f"a {width}x{height} (width x height) image's {num_tokens} tokens"
        if longer[1] + num_tokens > self.max_model_len:
            if bare_len + num_tokens > self.max_model_len:
                raise ItemError(f"{where}: size is too large for this server: {image} after a {bare_len}-token "
                                f"header need {bare_len + num_tokens} positions, beyond max_model_len "
                                f"{self.max_model_len}", "size")
            raise ItemError(f"{where}: {longer[0]} is too long for this server: {longer[1]} prompt tokens and "
                            f"{image} need {longer[1] + num_tokens} positions, beyond max_model_len "
                            f"{self.max_model_len}", longer[0])
        if self.kv_blocks is not None and blocks(cond_len, uncond_len) > self.kv_blocks:
            if blocks(bare_len, bare_len) > self.kv_blocks:
                raise ItemError(f"{where}: size is too large for this server: the two CFG halves of {image} need "
                                f"{blocks(bare_len, bare_len)} KV blocks; the cache has {self.kv_blocks} (raise the "
                                "KV cache size)", "size")
            raise ItemError(f"{where}: {longer[0]} is too long for this server: with {image} the two CFG halves "
                            f"need {blocks(cond_len, uncond_len)} KV blocks; the cache has {self.kv_blocks}",
                            longer[0])
        if self.pair_scheduler and cond_len + uncond_len > self.max_batched_tokens:
            raise ItemError(f"{where}: {longer[0]} is too long for this server: the two prompts "
                            f"({cond_len + uncond_len} tokens) exceed max_num_batched_tokens "
                            f"{self.max_batched_tokens}", longer[0])


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(model: str | os.PathLike) -> str:
    """The model argument, checked without loading anything: an existing checkpoint folder, or a hub id.

    A path that does not exist and does not look like `org/name` is a typo, not a hub id: say so plainly.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model {text}: not a checkpoint folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {text}: no config.json there, so it is not a checkpoint folder")
        return text
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text  # resolved by transformers / vLLM from the model hub or its cache
    raise FileNotFoundError(f"model {text}: no such checkpoint folder")
