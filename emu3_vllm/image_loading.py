"""Reading an image as a viewer shows it, the same way on every path (offline API, CLI, lmms-eval, server chat).

A plain `img.convert("RGB")` reads a phone photo sideways (EXIF orientation), turns transparent pixels black and
clips 16-bit greyscale to almost white. vLLM's chat route already fixes the first two (EXIF, alpha on white) but not
the third, so `load_image` follows vLLM where vLLM is right and `use_for_vllm_media` makes vLLM follow us where it is
not: then a file gets the same pixels, hence the same answer, offline and from `/v1/chat/completions`.

Rules (`to_rgb`), for the first frame of an animation, after EXIF orientation:

- RGB: as is (vLLM too; a `transparency` colour on an RGB PNG is ignored, as vLLM ignores it).
- Alpha (RGBA, LA, PA, RGBa, La) and `transparency` info (P, L, 1, and 16-bit greyscale): composited on white.
- I;16 (any byte order): `round(v / 257)`, which maps 0..65535 exactly onto 0..255.
- I (32-bit): Pillow decodes 16-bit PGM (and older Pillows 16-bit PNG) into I, so values that all fit 0..65535
  are read as 16-bit, like I;16. Otherwise the image uses the int32 range: 0..2**31-1 scaled to 0..255, negatives 0.
- F (float): 0..1 if every finite value is <= 1, else 0..255; out of range clipped, NaN 0.
- Anything else (L, P, 1, CMYK, YCbCr, LAB, HSV): Pillow's own conversion.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

MAX_ASPECT_RATIO = 200  # transformers' Emu3 `smart_resize` refuses longer/shorter side ratios beyond this
WHITE = (255, 255, 255)  # vLLM's default `rgba_background_color`, and what a viewer shows behind transparency

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


def load_image(image: Any, where: str) -> Image.Image:
    """An RGB PIL image, as a viewer shows it, from a PIL image, a path or bytes; fully decoded so corrupt data
    fails here. A PIL image is taken at its current frame; a file or bytes at its first."""
    from PIL import Image

    from emu3_vllm.offline.items import ItemError  # here, not at the top: inputs re-exports this module's load_image

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
    return to_rgb(upright(img))


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says; `img` itself when there is nothing to turn."""
    from PIL import ImageOps

    try:
        # Checked first because exif_transpose copies every image, even one with nothing to turn.
        if img.getexif().get(_EXIF_ORIENTATION) not in range(2, 9):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a picture a viewer shows, nor does vLLM
        return img


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """`img` in RGB per the module's rules; `img` itself when it already is RGB."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        grey = Image.fromarray(_to_8bit(img))
        alpha = _deep_transparency_mask(img)
        return _on_background(grey.convert("RGBA"), background, alpha) if alpha is not None else grey.convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info or (mode == "P" and _palette_has_alpha(img)):
        # Pillow converts La to LA but not to RGBA.
        rgba = img if mode == "RGBA" else (img.convert("LA") if mode == "La" else img).convert("RGBA")
        return _on_background(rgba, background)
    return img.convert("RGB")


def use_for_vllm_media() -> bool:
    """Make vLLM's image loader (chat `image_url`s: http, data and file URLs) in this process convert decoded images
    with `to_rgb` whenever it targets RGB. Idempotent; False (and nothing done) when vLLM is not importable.

    The hook is `ImageMediaIO._convert_image_mode`: load_bytes, load_base64 and load_file all end there, after vLLM
    has opened the first frame, applied EXIF orientation and decoded. A request's `rgba_background_color` is kept;
    other target modes (`image_mode: None`, "RGBA", ...) stay vLLM's."""
    try:
        from vllm.multimodal.media.base import MediaWithBytes
        from vllm.multimodal.media.image import ImageMediaIO
    except ImportError:  # no vLLM (or one without this loader): nothing to align
        return False

    stock = ImageMediaIO._convert_image_mode
    if getattr(stock, "_emu3_to_rgb", False):
        return True

    def _convert_image_mode(self, image):
        if self.image_mode != "RGB":
            return stock(self, image)
        if isinstance(image, MediaWithBytes):
            image = image.media
        return to_rgb(image, tuple(self.rgba_background_color))

    _convert_image_mode._emu3_to_rgb = True
    _convert_image_mode.__doc__ = stock.__doc__
    _convert_image_mode.__wrapped__ = stock  # lets tests (and a curious reader) reach vLLM's own conversion
    ImageMediaIO._convert_image_mode = _convert_image_mode
    return True


# --------------------------------------------------------------------------------------------------------------
# Deep (16/32-bit integer, float) greyscale


def _to_8bit(img: Image.Image):
    """An (h, w) uint8 array of `img`'s I;16*, I or F values scaled per the module's rules."""
    import numpy as np

    values = np.asarray(img)
    if img.mode == "F":
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1 else 1.0
        return np.clip(np.rint(np.nan_to_num(values * scale, nan=0.0)), 0, 255).astype(np.uint8)
    values = values.astype(np.int64)
    if img.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 0xFFFF):
        # (v + 128) // 257 is round(v / 257): 257 is odd, so no value is halfway.
        return ((np.clip(values, 0, 0xFFFF) + 128) // 257).astype(np.uint8)
    return np.rint(np.clip(values, 0, 2**31 - 1) * (255 / (2**31 - 1))).astype(np.uint8)


def _deep_transparency_mask(img: Image.Image) -> Image.Image | None:
    """An L mask (0 where the deep image's `transparency` value is, 255 elsewhere), or None without one."""
    import numpy as np
    from PIL import Image

    key = img.info.get("transparency")
    if not isinstance(key, int):
        return None
    return Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------
# Transparency


def _palette_has_alpha(img: Image.Image) -> bool:
    return img.palette is not None and img.palette.mode == "RGBA"


def _on_background(rgba: Image.Image, background: tuple[int, int, int], mask: Image.Image | None = None):
    """`rgba` pasted on `background` through its alpha (or `mask`): the very paste vLLM's `rgba_to_rgb` does, so the
    pixels match it exactly."""
    from PIL import Image

    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=mask if mask is not None else rgba.getchannel("A"))
    return out
