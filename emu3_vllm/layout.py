"""Emu3's image-generation token layout, from the checkpoint's own token ids.

After the header `<|image start|>{h}*{w}<|image token|>` the model writes h rows of (w visual tokens, EOL),
then EOF, EOI and EOS: h*(w+1) + 3 tokens. Position k (0-based, counted from the first generated token) is
constrained exactly as Emu3's `prefix_allowed_tokens_fn` constrains offset k+1 after `<|image token|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

# Pixels per visual token along each side (transformers' Emu3Processor `downsample_ratio`).
SPATIAL_FACTOR = 8


class Slot(IntEnum):
    VISUAL = 0
    EOL = 1
    EOF = 2
    EOI = 3
    EOS = 4
    DONE = 5  # past the end: nothing may follow


@dataclass(frozen=True)
class ImageTokenIds:
    """The ids the layout needs, read from a checkpoint's `vocabulary_map` / tokenizer."""

    visual: tuple[int, ...]  # visual-token id of each VQ code, indexed by code
    eol: int
    eof: int
    eoi: int
    eos: int
    boi: int
    image_wrapper: int
    pad: int | None = None

    @classmethod
    def from_vocabulary(cls, vocabulary_map: Mapping[str, int], *, eos_token: str, boi_token: str = "<|image start|>",
                        eoi_token: str = "<|image end|>", image_wrapper_token: str = "<|image token|>",
                        eol_token: str = "<|extra_200|>", eof_token: str = "<|extra_201|>",
                        pad_token: str | None = None) -> ImageTokenIds:
        codes = {}
        for name, token_id in vocabulary_map.items():
            if name.startswith("<|visual token"):
                codes[int(name[-8:-2])] = token_id  # "<|visual token 001234|>", as transformers parses it
        if not codes or sorted(codes) != list(range(len(codes))):
            raise ValueError("vocabulary_map has no contiguous <|visual token NNNNNN|> entries")
        return cls(
            visual=tuple(codes[c] for c in range(len(codes))),
            eol=vocabulary_map[eol_token], eof=vocabulary_map[eof_token], eoi=vocabulary_map[eoi_token],
            eos=vocabulary_map[eos_token], boi=vocabulary_map[boi_token],
            image_wrapper=vocabulary_map[image_wrapper_token],
            pad=vocabulary_map.get(pad_token) if pad_token else None,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ImageTokenIds:
        """From an Emu3 tokenizer carrying `boi_token`/`eoi_token`/`image_wrapper_token`/`eof_token`."""
        vocab = tokenizer.get_vocab()
        return cls.from_vocabulary(vocab, eos_token=tokenizer.eos_token, boi_token=tokenizer.boi_token,
                                   eoi_token=tokenizer.eoi_token, image_wrapper_token=tokenizer.image_wrapper_token,
                                   eof_token=tokenizer.eof_token, pad_token=tokenizer.pad_token)

    @property
    def codebook_size(self) -> int:
        return len(self.visual)

    @cached_property  # read every engine step; checking 32768 ids each time would cost more than the step's math
    def visual_range(self) -> tuple[int, int]:
        """(first, last + 1) visual-token ids: Emu3's vocabulary lists the codes contiguously, in order."""
        lo = self.visual[0]
        if self.visual != tuple(range(lo, lo + len(self.visual))):
            raise ValueError("the visual tokens' ids are not contiguous in code order; Emu3's vocabulary has them so")
        return lo, lo + len(self.visual)

    def slot_token(self, s: Slot) -> int | None:
        """The one token a single-token slot allows (EOL, EOF, EOI, EOS; pad past the end, if known)."""
        return {Slot.EOL: self.eol, Slot.EOF: self.eof, Slot.EOI: self.eoi, Slot.EOS: self.eos,
                Slot.DONE: self.pad}[s]


def num_image_tokens(h: int, w: int) -> int:
    """Generated tokens for an h x w token grid: h rows of w + EOL, then EOF, EOI, EOS."""
    return h * (w + 1) + 3


def slot(k: int, h: int, w: int) -> Slot:
    """What may be generated at position k (0-based) of an h x w image."""
    offset = k + 1
    body = h * (w + 1)
    if offset <= body:
        return Slot.EOL if offset % (w + 1) == 0 else Slot.VISUAL
    return {body + 1: Slot.EOF, body + 2: Slot.EOI, body + 3: Slot.EOS}.get(offset, Slot.DONE)


def layout_tokens(position, h, w, ids: ImageTokenIds):
    """`slot` for a batch (torch tensors of positions and grid sizes): the token each single-token slot forces
    (EOS at and past the end) and whether the slot is a visual token, as ([P] long, [P] bool)."""
    import torch

    offset = position + 1
    row = w + 1
    body = h * row
    in_body = offset <= body
    visual = in_body & (offset % row != 0)
    tail = offset - body

    def const(token):
        return torch.full_like(position, token)

    forced = torch.where(in_body, const(ids.eol),
                         torch.where(tail == 1, const(ids.eof), torch.where(tail == 2, const(ids.eoi), const(ids.eos))))
    return forced, visual


def allowed_token_ids(k: int, h: int, w: int, ids: ImageTokenIds) -> Sequence[int]:
    s = slot(k, h, w)
    if s is Slot.VISUAL:
        return ids.visual
    token = ids.slot_token(s)
    return () if token is None else (token,)


def header_text(h: int, w: int, *, boi_token: str, image_wrapper_token: str) -> str:
    """The prompt suffix that asks for an h x w image: `<|image start|>{h}*{w}<|image token|>`."""
    return f"{boi_token}{h}*{w}{image_wrapper_token}"


def pixels_to_tokens(pixels: int) -> int:
    """Visual tokens along one side: the nearest multiple of 8 pixels, halves rounded up (20 -> 24, 28 -> 32)."""
    return (pixels + SPATIAL_FACTOR // 2) // SPATIAL_FACTOR


def pixels_to_grid(height: int, width: int) -> tuple[int, int]:
    """Token grid for a requested pixel size; each side is rounded by `pixels_to_tokens`."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h, w = pixels_to_tokens(height), pixels_to_tokens(width)
    if h < 1 or w < 1:
        raise ValueError(f"image size {height}x{width} is below one {SPATIAL_FACTOR}-pixel token "
                         f"(the smallest side is {SPATIAL_FACTOR // 2} pixels, rounded up to {SPATIAL_FACTOR})")
    return h, w


def grid_to_pixels(h: int, w: int) -> tuple[int, int]:
    return h * SPATIAL_FACTOR, w * SPATIAL_FACTOR


class LayoutError(ValueError):
    pass


def parse_image_tokens(token_ids: Sequence[int], h: int, w: int, ids: ImageTokenIds) -> list[list[int]]:
    """The (h, w) grid of VQ codes in generated ids; a clear error where they break the layout."""
    expected = num_image_tokens(h, w)
    token_ids = list(token_ids)
    if len(token_ids) < expected:
        raise LayoutError(f"image is truncated: {len(token_ids)} of {expected} tokens for a {h}x{w} grid")
    code_of = {token_id: code for code, token_id in enumerate(ids.visual)}
    grid: list[list[int]] = []
    for r in range(h):
        row_ids = token_ids[r * (w + 1):(r + 1) * (w + 1)]
        codes = []
        for c, token_id in enumerate(row_ids[:w]):
            if token_id not in code_of:
                raise LayoutError(f"row {r}, column {c}: token {token_id} is not a visual token")
            codes.append(code_of[token_id])
        if row_ids[w] != ids.eol:
            raise LayoutError(f"row {r}: expected end-of-line {ids.eol}, got {row_ids[w]}")
        grid.append(codes)
    tail = token_ids[h * (w + 1):expected]
    if tail != [ids.eof, ids.eoi, ids.eos]:
        raise LayoutError(f"expected end-of-frame, end-of-image, EOS {[ids.eof, ids.eoi, ids.eos]}, got {tail}")
    return grid
