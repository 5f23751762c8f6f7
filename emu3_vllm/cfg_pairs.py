"""The CFG request protocol: one image is two vLLM requests tagged as a pair, and two outputs become one result.

Every front end (the offline API, the CLI, the HTTP route, Ray actors) turns an `ImageSpec` into its two prompts and
two `SamplingParams` here; the engine side (the pair scheduler and both logits-processor adapters) reads the same
tags back here; and the two finished token lists become one code grid, or one error, here.

The tag lives in `SamplingParams.extra_args["emu3_cfg"]`: the pair id (unique among the engine's live requests), the
half's role, the guidance scale, the token grid, the seed and the sampling settings. The engine side samples with
temperature 0 on the forced one-hot rows the CFG step writes, so the tag carries the image's own temperature/top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from emu3_vllm.layout import (
    ImageTokenIds,
    LayoutError,
    grid_to_pixels,
    header_text,
    num_image_tokens,
    parse_image_tokens,
)

EXTRA_ARGS_KEY = "emu3_cfg"
COND, UNCOND = "cond", "uncond"
REQUIRED_ARGS = frozenset({"pair", "role", "scale", "h", "w", "seed"})


@dataclass(frozen=True)
class ImageSpec:
    """Everything that defines one generated image: the same spec gives the same image on any batch or device."""

    prompt: str
    h: int  # token rows (pixels / 8)
    w: int  # token columns
    cfg_scale: float
    seed: int
    negative_prompt: str
    positive_suffix: str
    top_k: int
    temperature: float

    @property
    def height(self) -> int:
        return grid_to_pixels(self.h, self.w)[0]

    @property
    def width(self) -> int:
        return grid_to_pixels(self.h, self.w)[1]

    @property
    def num_tokens(self) -> int:
        """Tokens each half generates: h rows of w visual tokens + EOL, then EOF, EOI, EOS."""
        return num_image_tokens(self.h, self.w)

    def record(self) -> dict:
        """The spec as the image settings (`settings.IMAGE_FIELDS`), with the pixel size: what a manifest stores
        and compares."""
        from emu3_vllm.settings import IMAGE_FIELDS

        return {name: getattr(self, name) for name in IMAGE_FIELDS}

    @classmethod
    def from_record(cls, record) -> ImageSpec:
        """The spec a `record()` came from."""
        from emu3_vllm.layout import pixels_to_grid
        from emu3_vllm.settings import IMAGE_FIELDS, field_kind

        values = {name: field_kind(name)(record[name]) for name in IMAGE_FIELDS if name not in ("height", "width")}
        h, w = pixels_to_grid(int(record["height"]), int(record["width"]))
        return cls(h=h, w=w, **values)


@dataclass(frozen=True)
class PromptTokens:
    """The checkpoint's token strings a generation prompt is built from."""

    bos: str
    boi: str
    image_wrapper: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PromptTokens:
        return cls(bos=tokenizer.bos_token, boi=tokenizer.boi_token, image_wrapper=tokenizer.image_wrapper_token)


def pair_prompts(spec: ImageSpec, tokens: PromptTokens) -> tuple[str, str]:
    """(cond, uncond) prompt texts. Both end with the image header, as in Emu3's official script."""
    header = header_text(spec.h, spec.w, boi_token=tokens.boi, image_wrapper_token=tokens.image_wrapper)
    return (tokens.bos + spec.prompt + spec.positive_suffix + header, tokens.bos + spec.negative_prompt + header)


def bare_prompt(spec: ImageSpec, tokens: PromptTokens) -> str:
    """The shortest prompt for this image (BOS and the header, no text): what a size must fit after, so a limit
    check can tell a too-large image from a too-long prompt."""
    return tokens.bos + header_text(spec.h, spec.w, boi_token=tokens.boi, image_wrapper_token=tokens.image_wrapper)


def pair_tag(spec: ImageSpec, pair_id: str) -> dict:
    return {"pair": pair_id, "scale": float(spec.cfg_scale), "h": spec.h, "w": spec.w, "seed": int(spec.seed),
            "temperature": float(spec.temperature), "top_k": int(spec.top_k)}


def pair_sampling_params(spec: ImageSpec, pair_id: str) -> tuple:
    """(cond, uncond) `SamplingParams`: each decodes exactly the image's tokens; the CFG step forces every one."""
    from vllm import SamplingParams

    tag = pair_tag(spec, pair_id)
    return tuple(SamplingParams(max_tokens=spec.num_tokens, temperature=0.0,
                                extra_args={EXTRA_ARGS_KEY: {**tag, "role": role}}) for role in (COND, UNCOND))


# --------------------------------------------------------------------------------------------------------------
# The engine side reads the tags


@dataclass
class PairHalf:
    pair: str
    role: str
    scale: float
    h: int
    w: int
    key: int  # pair_key(seed)
    temperature: float
    top_k: int
    output_ids: list[int]  # vLLM's live list of this request's generated tokens (V1 runner only)


def cfg_args(params) -> dict | None:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(EXTRA_ARGS_KEY)


def pair_id_of(params) -> str | None:
    args = cfg_args(params)
    return None if args is None else str(args["pair"])


def validate_cfg_args(params) -> None:
    args = cfg_args(params)
    if args is None:
        return
    if not isinstance(args, dict):
        raise ValueError(f"{EXTRA_ARGS_KEY} must be a dict, got {type(args).__name__}")
    missing = REQUIRED_ARGS - set(args)
    if missing:
        raise ValueError(f"{EXTRA_ARGS_KEY} lacks {sorted(missing)}")
    if args["role"] not in (COND, UNCOND):
        raise ValueError(f"{EXTRA_ARGS_KEY}.role must be 'cond' or 'uncond', got {args['role']!r}")
    # The same bounds the front ends check: a value past them would overflow the worker's torch tensors.
    from emu3_vllm.settings import CfgScale, Seed, SettingsError, Side, Temperature, TopK, check_value

    bounds = {"seed": Seed, "top_k": TopK, "scale": CfgScale, "temperature": Temperature, "h": Side, "w": Side}
    for name, field_type in bounds.items():
        if name in args:
            try:
                check_value(field_type, args[name], f"{EXTRA_ARGS_KEY}.{name}")
            except SettingsError as exc:
                raise ValueError(str(exc)) from None


def pair_half(params, output_ids: list[int] | None = None) -> PairHalf | None:
    from emu3_vllm.kernels import pair_key

    args = cfg_args(params)
    if args is None:
        return None
    return PairHalf(pair=str(args["pair"]), role=args["role"], scale=float(args["scale"]), h=int(args["h"]),
                    w=int(args["w"]), key=pair_key(args["seed"]), temperature=float(args.get("temperature", 1.0)),
                    top_k=int(args.get("top_k", 0)), output_ids=output_ids if output_ids is not None else [])


# --------------------------------------------------------------------------------------------------------------
# Two outputs become one result


class PairError(ValueError):
    """The two halves of an image did not produce one well-formed image."""


def pair_codes(cond_ids: Sequence[int], uncond_ids: Sequence[int], h: int, w: int,
               ids: ImageTokenIds) -> list[list[int]]:
    """The (h, w) code grid both halves generated, or a `PairError` saying what went wrong."""
    cond_ids, uncond_ids = list(cond_ids), list(uncond_ids)
    try:
        if cond_ids != uncond_ids:
            raise LayoutError("the CFG halves generated different tokens")
        return parse_image_tokens(cond_ids, h, w, ids)
    except LayoutError as exc:
        # The CFG step ends a pair that fell out of lockstep with EOS wherever the layout does not allow it.
        ended_early = ids.eos in cond_ids[:-1] or (
            bool(cond_ids) and cond_ids[-1] == ids.eos and len(cond_ids) < num_image_tokens(h, w))
        if ended_early:
            raise PairError("its CFG halves fell out of lockstep and the image was stopped after "
                            f"{len(cond_ids)} tokens") from exc
        raise PairError(str(exc)) from exc
