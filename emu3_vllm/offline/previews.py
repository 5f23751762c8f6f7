"""Previews of an image while it is drawn. Emu3 writes an image row by row, so a preview is simply the rows of codes
generated so far, VQ-decoded and shown at the final size over a neutral fill: an honest, cheap progress view, the
same rows the finished image will have (up to the decoder's smoothing across the edge of what is drawn).

`k` previews (0 to `MAX_PREVIEWS`, OpenAI's `partial_images` bound) come at evenly spaced row counts: preview j
(0-based) once ceil((j + 1) * h / (k + 1)) of the image's h token rows are drawn. The rows not yet drawn are
`FILL`, a mid grey. Both CFG halves write the same tokens (the CFG step forces them), so one half's tokens are the
image's. The offline stream (`image_stream`) and the images route share this module; both decode previews on their
decode batcher, off the engine loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from emu3_vllm.layout import ImageTokenIds

MAX_PREVIEWS = 3
FILL = (128, 128, 128)  # the rows not yet drawn: mid grey, neither the white background nor any shape's colour


@dataclass
class ImagePreview:
    """Preview `preview_index` (0-based) of item `index`: `rows` of its token rows drawn, `image` at the final size
    (PIL, or whatever the decode's postprocess made of it)."""

    index: int
    preview_index: int
    rows: int
    image: Any = None


def preview_rows(h: int, k: int) -> list[int]:
    """The drawn row counts at which k previews of an image of h token rows are shown (k values, never 0)."""
    return [max(1, math.ceil((j + 1) * h / (k + 1))) for j in range(k)]


def compose(drawn, height: int, width: int):
    """The drawn rows' pixels at the top of a `FILL` canvas of the final size."""
    from PIL import Image

    canvas = Image.new("RGB", (width, height), FILL)
    canvas.paste(drawn.convert("RGB"), (0, 0))
    return canvas


class RowWatcher:
    """Follows one image's generated tokens (fed as they arrive) and says when each preview is due, with the code
    grid of the rows drawn by then."""

    def __init__(self, h: int, w: int, k: int, ids: ImageTokenIds):
        self.w = w
        self.due = preview_rows(h, k)
        self.tokens: list[int] = []
        self._next = 0
        self._code_of = {token_id: code for code, token_id in enumerate(ids.visual)}

    def feed(self, new_tokens) -> list[tuple[int, int, list[list[int]]]]:
        """(preview index, rows, code grid) of each preview these tokens make due. A row that is not visual tokens
        (a pair out of lockstep) ends the previews: the image itself reports the error."""
        self.tokens.extend(new_tokens)
        rows = len(self.tokens) // (self.w + 1)
        due = []
        while self._next < len(self.due) and self.due[self._next] <= rows:
            count = self.due[self._next]
            grid = self._grid(count)
            if grid is None:
                self._next = len(self.due)
                break
            due.append((self._next, count, grid))
            self._next += 1
        return due

    def _grid(self, rows: int) -> list[list[int]] | None:
        grid = []
        for r in range(rows):
            row = self.tokens[r * (self.w + 1):r * (self.w + 1) + self.w]
            codes = [self._code_of.get(token_id) for token_id in row]
            if None in codes:
                return None
            grid.append(codes)
        return grid
