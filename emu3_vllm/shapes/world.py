"""The shapes world: 64x64 images of one filled shape on white, the captions and questions about them, and a
pixel classifier that reads colour and shape back from an image.

The rules are exact so that anyone can draw fresh samples: the committed shapes checkpoint was trained on this
world, and its tests judge what it draws and what it answers against it.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE = 24, 44

COLOUR_QUESTION = "What color is the shape?"
SHAPE_QUESTION = "What shape is this?"
DESCRIBE_QUESTION = "Describe the image."
QUESTIONS = (COLOUR_QUESTION, SHAPE_QUESTION, DESCRIBE_QUESTION)


def caption(colour: str, shape: str) -> str:
    """The generation caption, which is also the answer to `DESCRIBE_QUESTION`."""
    return f"a {colour} {shape}"


def all_captions() -> list[str]:
    """All 18 captions, colour-major."""
    return [caption(c, s) for c in PALETTE for s in SHAPES]


@dataclass(frozen=True)
class ShapeSample:
    shape: str
    colour: str
    side: int
    x0: int
    y0: int

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)

    def answer(self, question: str) -> str:
        if question == COLOUR_QUESTION:
            return self.colour
        if question == SHAPE_QUESTION:
            return self.shape
        if question == DESCRIBE_QUESTION:
            return self.caption
        raise ValueError(f"not a shapes-world question: {question!r}; ask one of {QUESTIONS}")

    def image(self):
        return draw(self.shape, self.colour, self.side, self.x0, self.y0)

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) centre of the drawn pixels."""
        return mask_centroid(non_white_mask(self.image()))


def draw(shape: str, colour: str, side: int, x0: int, y0: int):
    """The world's drawing rule: PIL `ImageDraw` on a white 64x64 canvas, box (x0, y0, x0+s, y0+s), no outline."""
    from PIL import Image, ImageDraw

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; one of {sorted(PALETTE)}")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    fill = PALETTE[colour]
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def sample(rng) -> ShapeSample:
    """One uniform sample: shape, colour, side in [24, 44], top-left corner uniform with the box on the canvas.

    `rng` is a `numpy.random.Generator`. The box spans pixels x0..x0+s inclusive, so x0 is in [0, 63 - s].
    """
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    x0 = int(rng.integers(0, IMAGE_SIZE - side))
    y0 = int(rng.integers(0, IMAGE_SIZE - side))
    return ShapeSample(shape, colour, side, x0, y0)


def samples(n: int, seed: int) -> list[ShapeSample]:
    """`n` fresh samples drawn from `seed`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [sample(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Pixel classifier

# Every palette colour has a channel at or below 60 and the background has none below 255, so a pixel is part of
# the shape when its darkest channel is below the midpoint; this also splits blurred edges down the middle.
_INK_THRESHOLD = 128
# Filled fraction of the shape's bounding box: square 1, circle ~pi/4, triangle ~1/2.
SQUARE_MIN_FILL = 0.9
TRIANGLE_MAX_FILL = 0.65


def non_white_mask(image):
    """Boolean (H, W) array: the pixels that belong to the shape."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return pixels.min(axis=-1) < _INK_THRESHOLD


def mask_centroid(mask) -> tuple[float, float]:
    import numpy as np

    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (float("nan"), float("nan"))
    return float(xs.mean()), float(ys.mean())


def fill_ratio(mask) -> float:
    """Shape pixels over the area of their bounding box (0 for an empty mask)."""
    import numpy as np

    ys, xs = np.nonzero(mask)
    if not len(xs):
        return 0.0
    area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return float(len(xs) / area)


def nearest_palette_colours(image, mask):
    """Palette index (in `PALETTE` order) of the nearest colour to each pixel under `mask`."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)[mask]
    palette = np.asarray(list(PALETTE.values()), dtype=np.float32)
    return ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(-1)


def classify(image) -> tuple[str | None, str | None]:
    """(colour, shape) read from the pixels: the palette colour most of the shape's pixels are nearest to, and
    the shape whose bounding-box fill ratio matches. (None, None) for an image with no shape pixels."""
    import numpy as np

    mask = non_white_mask(image)
    if not mask.any():
        return None, None
    nearest = nearest_palette_colours(image, mask)
    colour = list(PALETTE)[int(np.bincount(nearest, minlength=len(PALETTE)).argmax())]
    ratio = fill_ratio(mask)
    shape = "square" if ratio >= SQUARE_MIN_FILL else "triangle" if ratio <= TRIANGLE_MAX_FILL else "circle"
    return colour, shape


def off_colour_share(image, colour: str) -> float:
    """The share of the shape's pixels whose nearest palette colour is not `colour` (0 for an image with no shape
    pixels): what guidance that pushes the wrong way paints into a shape."""
    mask = non_white_mask(image)
    if not mask.any():
        return 0.0
    nearest = nearest_palette_colours(image, mask)
    return float((nearest != list(PALETTE).index(colour)).mean())


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) between two RGB images of one size, over 0..255."""
    import math

    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
