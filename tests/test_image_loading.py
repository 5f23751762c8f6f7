"""One image loader for every path: `load_image` reads a file as a viewer shows it, vLLM's own chat loader is the
oracle where it is right, and after `use_for_vllm_media()` vLLM reads every file exactly as we do. No engine."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from emu3_vllm.image_loading import MAX_ASPECT_RATIO, load_image, to_rgb, use_for_vllm_media
from emu3_vllm.offline import items as inputs
from emu3_vllm.offline.items import ItemError

image_media = pytest.importorskip("vllm.multimodal.media.image")
ImageMediaIO = image_media.ImageMediaIO

W, H = 48, 32


# --------------------------------------------------------------------------------------------------------------
# Files of every mode, built in memory


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo() -> Image.Image:
    """Asymmetric, so a wrong rotation or flip cannot go unnoticed."""
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    rgb = np.stack([x * 5, y * 7, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    rgb[:8, :12] = (250, 20, 20)
    return Image.fromarray(rgb)


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(_photo(), "JPEG", quality=95, exif=exif.tobytes())


def _rgba() -> bytes:
    a = np.zeros((H, W, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 0)  # fully transparent red: a viewer shows the background
    a[:, 16:32] = (0, 0, 255, 128)  # half-transparent blue
    a[:, 32:] = (0, 160, 0, 255)  # opaque green
    return _save(Image.fromarray(a, "RGBA"), "PNG")


def _la() -> bytes:
    a = np.zeros((H, W, 2), np.uint8)
    a[..., 0] = 40
    a[:, : W // 2, 1] = 0
    a[:, W // 2:, 1] = 200
    return _save(Image.fromarray(a, "LA"), "PNG")


def _p_transparency() -> bytes:
    p = Image.new("P", (W, H), 0)
    p.putpalette([0, 0, 0, 200, 30, 30, 30, 30, 200] + [0] * (256 - 3) * 3)
    p.paste(1, (0, 0, W // 2, H))
    p.paste(2, (W // 2, 0, W, H // 2))  # the rest stays index 0, the transparent one
    return _save(p, "PNG", transparency=0)


def _grey16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))


def _animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (W, H), c) for c in ((200, 40, 40), (40, 40, 200), (40, 200, 40))]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _grey16_trns() -> bytes:
    return _save(Image.fromarray(_grey16()), "PNG", transparency=int(_grey16()[0, 0]))


def _int32() -> bytes:
    return _save(Image.fromarray(np.tile(np.linspace(0, 2**31 - 1, W), (H, 1)).astype(np.int32)), "TIFF")


def _float(top: float) -> bytes:
    return _save(Image.fromarray(np.tile(np.linspace(0, top, W, dtype=np.float32), (H, 1))), "TIFF")


# name -> (file bytes, mode Pillow decodes it to, does stock vLLM read it as a viewer does?)
CASES = {
    "RGB jpeg": (_save(_photo(), "JPEG", quality=95), "RGB", True),
    "RGB jpeg, EXIF 6": (_exif_jpeg(6), "RGB", True),
    "RGB jpeg, EXIF 3": (_exif_jpeg(3), "RGB", True),
    "RGBA png": (_rgba(), "RGBA", True),
    "LA png": (_la(), "LA", True),
    "P png + transparency": (_p_transparency(), "P", True),
    "P gif, animated": (_animation("GIF"), "P", True),
    "RGB apng, animated": (_animation("PNG"), "RGB", True),
    "RGB webp, animated": (_animation("WEBP"), "RGB", True),
    "CMYK jpeg": (_save(_photo().convert("CMYK"), "JPEG", quality=95), "CMYK", True),
    "CMYK tiff": (_save(_photo().convert("CMYK"), "TIFF"), "CMYK", True),
    "L png": (_save(_photo().convert("L"), "PNG"), "L", True),
    "1 png": (_save(_photo().convert("1"), "PNG"), "1", True),
    "I;16 png": (_save(Image.fromarray(_grey16()), "PNG"), "I;16", False),
    "I;16 png + transparency": (_grey16_trns(), "I;16", False),
    "I;16B tiff": (_save(Image.frombytes("I;16B", (W, H), _grey16().astype(">u2").tobytes()), "TIFF"), "I;16B",
                   False),
    "I pgm (16-bit)": (_save(Image.fromarray(_grey16()), "PPM"), "I", False),
    "I tiff (32-bit)": (_int32(), "I", False),
    "F tiff 0..1": (_float(1.0), "F", False),
    "F tiff 0..255": (_float(255.0), "F", False),
}


def _px(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB", img.mode
    return np.asarray(img)


def _vllm(data: bytes) -> Image.Image:
    """vLLM's chat route decoding a file: every `image_url` (http, data:, file:) ends in this `load_bytes`."""
    return ImageMediaIO(image_mode="RGB").load_bytes(data).media


@pytest.fixture
def vllm_stock(monkeypatch):
    """vLLM's loader as shipped, whatever an earlier test in this process did to it."""
    current = ImageMediaIO._convert_image_mode
    monkeypatch.setattr(ImageMediaIO, "_convert_image_mode", getattr(current, "__wrapped__", current))


@pytest.fixture
def vllm_ours(vllm_stock):
    """vLLM's loader after `use_for_vllm_media()`; monkeypatch puts the original back afterwards."""
    assert use_for_vllm_media()


def test_cases_decode_to_the_modes_they_exercise():
    for name, (data, mode, _) in CASES.items():
        assert Image.open(io.BytesIO(data)).mode == mode, name


# --------------------------------------------------------------------------------------------------------------
# (a) vLLM's stock loader as the oracle, where it reads a file as a viewer does


@pytest.mark.parametrize("name", [n for n, (_, _, sensible) in CASES.items() if sensible])
def test_matches_stock_vllm_where_vllm_is_right(name, vllm_stock):
    # Both decode with the same Pillow in the same process, so even JPEG (and CMYK JPEG) pixels are identical:
    # exact equality, no decoder tolerance needed.
    data = CASES[name][0]
    np.testing.assert_array_equal(_px(load_image(data, name)), _px(_vllm(data)))


@pytest.mark.parametrize("orientation, turn", [(6, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(orientation, turn):
    data = _exif_jpeg(orientation)
    raw = Image.open(io.BytesIO(data))
    raw.load()
    img = load_image(data, "photo")
    assert img.size == raw.transpose(turn).size
    np.testing.assert_array_equal(_px(img), np.asarray(raw.transpose(turn)))


def test_alpha_is_composited_on_white():
    px = _px(load_image(CASES["RGBA png"][0], "rgba"))
    assert (px[:, :16] == 255).all()  # transparent red reads as the white behind it, not black
    assert np.abs(px[0, 20].astype(int) - (127, 127, 255)).max() <= 1  # half blue over white
    assert (px[:, 32:] == (0, 160, 0)).all()
    la = _px(load_image(CASES["LA png"][0], "la"))
    assert (la[:, : W // 2] == 255).all()
    assert np.abs(la[0, -1].astype(int) - round(40 * 200 / 255 + 255 * 55 / 255)).max() <= 1
    p = _px(load_image(CASES["P png + transparency"][0], "p"))
    assert (p[0, 0] == (200, 30, 30)).all() and (p[0, -1] == (30, 30, 200)).all() and (p[-1, -1] == 255).all()


def test_first_frame_of_an_animation():
    for name in ("P gif, animated", "RGB apng, animated", "RGB webp, animated"):
        px = _px(load_image(CASES[name][0], name)).astype(int)
        assert np.abs(px - (200, 40, 40)).max() <= 6, name  # WebP is lossy; the other frames are far off


@pytest.mark.parametrize("mode", ["PA", "RGBa", "La"])
def test_alpha_modes_without_a_file_format(mode):
    rgba = Image.fromarray(np.dstack([np.full((4, 4, 3), 60, np.uint8), np.array([0, 255, 128, 0] * 4,
                                                                                 np.uint8).reshape(4, 4)]), "RGBA")
    if mode == "PA":  # Pillow's LA -> PA conversion drops the alpha, so build PA from its bands
        img = Image.frombytes("PA", rgba.size, np.dstack([np.zeros((4, 4), np.uint8), np.asarray(rgba)[..., 3]]))
        img.putpalette([60, 60, 60] * 256)
    else:
        img = rgba.convert("LA").convert(mode) if mode == "La" else rgba.convert(mode)
    px = _px(to_rgb(img)).astype(int)
    assert (px[:, 0] == 255).all() and (px[:, 1] == 60).all()
    assert np.abs(px[:, 2] - round(60 * 128 / 255 + 255 * 127 / 255)).max() <= 2


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "CMYK", "L", "1", "P"])
def test_other_modes_convert_as_pillow_does(mode):
    img = _photo().convert(mode)
    np.testing.assert_array_equal(_px(to_rgb(img)), np.asarray(img.convert("RGB")))


def test_rgb_is_returned_as_is():
    img = _photo()
    assert to_rgb(img) is img
    assert load_image(img, "rgb") is img


# --------------------------------------------------------------------------------------------------------------
# (b) deep greyscale: scaled, not clipped to white


@pytest.mark.parametrize("name", ["I;16 png", "I;16B tiff", "I pgm (16-bit)"])
def test_16_bit_is_scaled_by_257(name, vllm_stock):
    data = CASES[name][0]
    px = _px(load_image(data, name))
    want = np.rint(_grey16() / 257).astype(np.uint8)
    np.testing.assert_array_equal(px, np.repeat(want[..., None], 3, axis=-1))
    assert px[..., 0].min() == 0 and px[..., 0].max() == 255 and 120 < px.mean() < 135
    assert _px(_vllm(data)).mean() > 240  # what stock vLLM (and a plain convert("RGB")) reads: nearly all white


def test_16_bit_transparency_is_composited():
    px = _px(load_image(CASES["I;16 png + transparency"][0], "trns"))
    assert (px[:, 0] == 255).all()  # the transparent value (black) reads as white
    np.testing.assert_array_equal(px[:, 1:, 0], np.rint(_grey16()[:, 1:] / 257).astype(np.uint8))


def test_32_bit_int_uses_the_int32_range():
    px = _px(load_image(CASES["I tiff (32-bit)"][0], "i32"))[0, :, 0]
    want = np.rint(np.linspace(0, 2**31 - 1, W).astype(np.int32) * (255 / (2**31 - 1))).astype(np.uint8)
    np.testing.assert_array_equal(px, want)


@pytest.mark.parametrize("top", [1.0, 255.0])
def test_float_is_0_to_1_or_0_to_255(top):
    px = _px(load_image(_float(top), "f"))[0, :, 0]
    values = np.linspace(0, top, W, dtype=np.float32)
    np.testing.assert_array_equal(px, np.rint(values * (255 if top == 1.0 else 1)).astype(np.uint8))
    assert px.max() == 255 and 120 < px.mean() < 135


def test_float_nan_and_out_of_range():
    f = Image.fromarray(np.array([[np.nan, -3.0, 0.5, 1.0]], np.float32))
    np.testing.assert_array_equal(_px(to_rgb(f))[0, :, 0], [0, 0, 128, 255])


# --------------------------------------------------------------------------------------------------------------
# (c) offline == server: vLLM after use_for_vllm_media() reads every file exactly as load_image does


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_after_use_for_vllm_media_matches_offline(name, vllm_ours):
    data = CASES[name][0]
    np.testing.assert_array_equal(_px(_vllm(data)), _px(load_image(data, name)))


def test_chat_data_url_after_use_for_vllm_media(vllm_ours):
    from vllm.multimodal.media import MediaConnector

    data = CASES["I;16 png"][0]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    np.testing.assert_array_equal(_px(MediaConnector().fetch_image(url)), _px(load_image(data, "i16")))


def test_use_for_vllm_media_is_idempotent_and_narrow(vllm_ours):
    hook = ImageMediaIO._convert_image_mode
    assert use_for_vllm_media() and ImageMediaIO._convert_image_mode is hook
    data = CASES["RGBA png"][0]
    assert ImageMediaIO(image_mode=None).load_bytes(data).media.mode == "RGBA"  # other target modes stay vLLM's
    red = _px(ImageMediaIO(image_mode="RGB", rgba_background_color=(255, 0, 0)).load_bytes(data).media)
    assert (red[:, :16] == (255, 0, 0)).all()  # a request's background colour is kept


def test_use_for_vllm_media_without_vllm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm.multimodal.media.image", None)  # makes the import fail
    assert use_for_vllm_media() is False


# --------------------------------------------------------------------------------------------------------------
# Errors, and the names callers import


def test_inputs_reexports_the_loader():
    assert inputs.load_image is load_image and inputs.MAX_ASPECT_RATIO == MAX_ASPECT_RATIO == 200


def test_path_input(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_exif_jpeg(6))
    np.testing.assert_array_equal(_px(load_image(path, "p")), _px(load_image(str(path), "p")))
    assert load_image(path, "p").size == (H, W)


@pytest.mark.parametrize("image, message", [
    (b"not an image", "item 3: cannot decode image (UnidentifiedImageError"),
    (CASES["RGB jpeg"][0][:200], "item 3: cannot decode image (OSError"),
    (Image.new("RGB", (0, 5)), "item 3: image has zero size (0x5)"),
    (Image.new("RGB", (201, 1)),
     "item 3: image is 201x1, an aspect ratio of 201; Emu3's image processor takes at most 200"),
    (3.5, "item 3: expected a PIL image, a path or bytes, got float"),
])
def test_errors(image, message):
    with pytest.raises(ItemError) as info:
        load_image(image, "item 3")
    assert str(info.value).startswith(message), str(info.value)


# --------------------------------------------------------------------------------------------------------------
# The table `pytest -s` shows


def mean_table() -> str:
    """mode | offline (ours) | vLLM stock | vLLM after use_for_vllm_media: mean pixel value of each file."""
    current = ImageMediaIO._convert_image_mode
    stock = getattr(current, "__wrapped__", current)
    rows = []
    try:
        for name, (data, _, _) in CASES.items():
            ImageMediaIO._convert_image_mode = stock
            vllm_stock = _px(_vllm(data)).mean()
            use_for_vllm_media()
            rows.append((name, _px(load_image(data, name)).mean(), vllm_stock, _px(_vllm(data)).mean()))
    finally:
        ImageMediaIO._convert_image_mode = current
    head = ("mode", "offline (ours)", "vLLM stock", "vLLM after use_for_vllm_media")
    width = max(len(r[0]) for r in rows)
    lines = [f"{head[0]:<{width}} | {head[1]} | {head[2]} | {head[3]}", "-" * (width + 63)]
    lines += [f"{n:<{width}} | {a:14.1f} | {b:10.1f} | {c:29.1f}" for n, a, b, c in rows]
    return "\n".join(lines)


def test_print_mean_table():
    table = mean_table()
    print("\n" + table)
    for line in table.splitlines()[2:]:
        _, ours, _, after = (cell.strip() for cell in line.split("|"))
        assert ours == after
