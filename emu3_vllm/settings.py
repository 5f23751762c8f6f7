"""The settings that define one generated image, with the bounds every layer below can hold: one typed model.

`ImageSettings` is the one place a field's type, range and default are written. The offline API, the CLI, prompt
files (text, JSON lines, parquet), the HTTP images route, lmms-eval model_args and Ray all validate through it, and
the HTTP route's request model reuses its field types, so `/openapi.json` states the same bounds that are enforced.

The bounds come from what sits downstream of a value:

- `seed`: a signed 64-bit integer. The engine hashes it into the image's noise key, and it travels as a vLLM
  `extra_args` value, a torch `long` and a parquet `int64` column; each overflows past int64.
- `top_k`: a 32-bit integer; 0 or -1 means no top-k (the kernel keeps at most the vocabulary anyway).
- `height`/`width`: 1 to `MAX_SIDE` pixels, each rounded to the nearest multiple of 8; the image needs at least
  two 8x8 tokens (transformers' VQ decoder normalises over a token grid, and one token is no grid).
- `cfg_scale` in (0, `MAX_CFG_SCALE`], `temperature` in [0, `MAX_TEMPERATURE`], both finite.
- `prompt` (not blank) and `negative_prompt` (may be empty): UTF-8 text of at most `MAX_PROMPT_CHARS` characters;
  how many tokens fit is the engine's max_model_len, checked where the engine is known.
- The engine's own seed (`Emu3(seed=)`, `--seed` of `understand`) goes to numpy's global seed: 0 to 2**32 - 1.

Integers are whole numbers (64.0 from JSON counts; 1.7, "3", true and null do not); numbers are finite reals.
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from emu3_vllm.layout import SPATIAL_FACTOR, pixels_to_grid, pixels_to_tokens
from emu3_vllm.prompts import DEFAULT_CFG_SCALE, NEGATIVE_PROMPT, POSITIVE_SUFFIX

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
ENGINE_SEED_MAX = 2**32 - 1  # numpy.random.seed's range
MAX_SIDE = 8192  # pixels; 1024x1024 tokens already need a million positions per half
MIN_TOKENS = 2
MAX_CFG_SCALE = 1000.0
MAX_TEMPERATURE = 1000.0
MAX_PROMPT_CHARS = 100_000
MAX_IMAGES = 10  # images per HTTP request (`n`), as vllm-omni's images route allows
MAX_PREVIEWS = 3  # previews of one image while it is drawn: OpenAI's bound on partial_images

DEFAULT_SIDE = 720  # Emu3's own image area is 720x720 (518,400 pixels)
DEFAULT_TOP_K = 2048  # Emu3's: 1/16 of its 32,768 codes


def show(value: Any) -> str:
    """A value as an error quotes it: short, whatever its size (a 5000-digit int has no str())."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PydanticCustomError("emu3", "must be an integer")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(float(value)) or not float(value).is_integer():
        raise PydanticCustomError("emu3", "must be an integer")
    return int(value)


def _real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PydanticCustomError("emu3", "must be a finite number")
    try:
        value = float(value)
    except OverflowError:  # an integer past the largest float
        raise PydanticCustomError("emu3", "must be a finite number") from None
    if not math.isfinite(value):
        raise PydanticCustomError("emu3", "must be a finite number")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("emu3", "must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("emu3", "is not valid Unicode text ({reason} at character {at})",
                                  {"reason": exc.reason, "at": exc.start}) from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("emu3", "is empty")
    return value


# The field types, shared with the HTTP request model (`serving` reuses them so the schema shows these bounds).
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), BeforeValidator(_whole)]
EngineSeed = Annotated[int, Field(ge=0, le=ENGINE_SEED_MAX), BeforeValidator(_whole)]
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX), BeforeValidator(_whole)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE), BeforeValidator(_whole)]
CfgScale = Annotated[float, Field(gt=0, le=MAX_CFG_SCALE), BeforeValidator(_real)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE), BeforeValidator(_real)]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), BeforeValidator(_string)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), BeforeValidator(_string),
                   AfterValidator(_not_blank)]
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES), BeforeValidator(_whole)]
Previews = Annotated[int, Field(ge=0, le=MAX_PREVIEWS), BeforeValidator(_whole)]  # OpenAI's partial_images


class ImageSettings(BaseModel):
    """Everything that defines one image, validated; the defaults are Emu3's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt = Field(description="what to draw")
    height: Side = Field(DEFAULT_SIDE, description="pixels, rounded to a multiple of 8")
    width: Side = Field(DEFAULT_SIDE, description="pixels, rounded to a multiple of 8")
    cfg_scale: CfgScale = Field(DEFAULT_CFG_SCALE, description="classifier-free guidance scale")
    seed: Seed = Field(0, description="the image's seed: the same seed and settings give the same image")
    negative_prompt: Text = Field(NEGATIVE_PROMPT, description="the unconditional half's prompt (default: Emu3's)")
    positive_suffix: Text = Field(POSITIVE_SUFFIX, description="appended to the prompt (default: Emu3's)")
    top_k: TopK = Field(DEFAULT_TOP_K, description="sample among the k likeliest codes (0 or -1: all)")
    temperature: Temperature = Field(1.0, description="sampling temperature (0: greedy)")

    @property
    def grid(self) -> tuple[int, int]:
        return pixels_to_grid(self.height, self.width)


# Everything that defines an image, in the order records and manifest columns list them.
IMAGE_FIELDS = tuple(ImageSettings.model_fields)


def field_type(name: str) -> Any:
    """An image setting's annotated type (`Side`, `Seed`, ...): what other models and parsers check it with."""
    import typing

    return typing.get_type_hints(ImageSettings, include_extras=True)[name]


def field_kind(name: str) -> type:
    """The Python type an image setting holds (int, float or str): what a typed column stores it as."""
    return ImageSettings.model_fields[name].annotation


# What a prompt item (a dict, a JSON line, a parquet row) may set for itself; the rest are the call's settings.
PER_PROMPT = ("height", "width", "cfg_scale", "seed", "negative_prompt")
# The settings a call (or a command line) sets for all of its prompts.
CALL_LEVEL = tuple(name for name in ImageSettings.model_fields if name not in ("prompt", "seed"))


class SettingsError(ValueError):
    """A value outside its field's type or range; `field` names it as the user wrote it."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.field = field


_BOUNDS = {"greater_than_equal": "must be >= {ge}", "less_than_equal": "must be <= {le}",
           "greater_than": "must be > {gt}", "less_than": "must be < {lt}",
           "string_too_long": "is longer than {max_length} characters", "string_too_short": "is empty",
           "too_long": "is longer than {max_length} characters", "too_short": "is empty",
           "missing": "is required", "extra_forbidden": "is not a known setting"}


def explain(error: ValidationError, field: str | None = None, given: dict | None = None) -> SettingsError:
    """The first problem of a pydantic error as one line, `{field} {what is wrong}, got {value}`; `field` names a
    value validated on its own (whose error has no location); `given`, the values as the user wrote them, so the
    message quotes `1e+20` rather than the integer it was read as."""
    first = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or field
    if given is not None and field in given:
        first["input"] = given[field]
    template = _BOUNDS.get(first["type"])
    if first["type"] == "greater_than_equal" and first.get("ctx", {}).get("ge") == 1:
        template = "must be a positive integer"
    elif first["type"] == "greater_than":
        template = "must be a finite number > {gt}"
    # A float bound that is whole reads as the integer it is (> 0, not > 0.0).
    bounds = {key: int(value) if isinstance(value, float) and value.is_integer() else value
              for key, value in first.get("ctx", {}).items()}
    what = template.format(**bounds) if template else first["msg"]
    if first["type"] == "missing":
        return SettingsError(f"{field} {what}", field)
    if first["type"] == "extra_forbidden":
        return SettingsError(f"{field} {what}; allowed: {list(ImageSettings.model_fields)}", field)
    return SettingsError(f"{field} {what}, got {show(first['input'])}", field)


def image_settings(**values: Any) -> ImageSettings:
    """`ImageSettings(**values)`, or a `SettingsError` naming the first bad field; also checks the token grid."""
    try:
        settings = ImageSettings(**values)
    except ValidationError as exc:
        raise explain(exc, given=values) from None
    check_grid(settings.height, settings.width)
    return settings


def check_grid(height: int, width: int) -> tuple[int, int]:
    """The token grid of a pixel size, or a `SettingsError` naming the side that is too small."""
    for field, value in (("height", height), ("width", width)):
        if pixels_to_tokens(value) < 1:
            raise SettingsError(f"{field} {value} is below one {SPATIAL_FACTOR}-pixel token (the smallest side is "
                                f"{SPATIAL_FACTOR // 2} pixels, rounded up to {SPATIAL_FACTOR})", field)
    h, w = pixels_to_grid(height, width)
    if h * w < MIN_TOKENS:
        raise SettingsError(f"size {height}x{width} is a single {SPATIAL_FACTOR}x{SPATIAL_FACTOR} token; an image "
                            f"needs at least {MIN_TOKENS} (the smallest sizes are {SPATIAL_FACTOR}x"
                            f"{2 * SPATIAL_FACTOR} and {2 * SPATIAL_FACTOR}x{SPATIAL_FACTOR})", "height")
    return h, w


_ADAPTERS: dict[int, TypeAdapter] = {}


def check_value(field_type: Any, value: Any, field: str) -> Any:
    """One value against one of the field types above, e.g. `check_value(EngineSeed, 7, "seed")`."""
    adapter = _ADAPTERS.get(id(field_type))
    if adapter is None:
        adapter = _ADAPTERS[id(field_type)] = TypeAdapter(field_type)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise explain(exc, field, {field: value}) from None
