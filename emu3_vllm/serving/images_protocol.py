"""The OpenAI Images API as Emu3 serves it: `POST /v1/images/generations`' pydantic request and response models,
and the request read from its raw body and turned into image specs, all without an engine.

The request has the OpenAI Images API shape, with Emu3's settings at the top level (where the OpenAI SDK's
`extra_body` puts them):

    {"prompt": "a red emu", "n": 2, "size": "512x512", "response_format": "b64_json", "model": "...",
     "seed": 7, "guidance_scale": 3.0, "negative_prompt": "...", "top_k": 2048, "temperature": 1.0}
    -> {"created": 1700000000, "size": "512x512", "output_format": "png",
        "data": [{"b64_json": "...", "seed": 7}, {"b64_json": "...", "seed": 8}]}

Image i of n gets seed `seed + i`, so each image equals `Emu3.generate_images` offline with that seed.

With `"stream": true` the answer is server-sent events, as OpenAI streams images: `partial_images` k (0 to 3)
`image_generation.partial_image` events per image while it is drawn (the rows drawn so far over a mid-grey fill,
see `offline.previews`), then one `image_generation.completed` event with the finished image (the same pixels as
without streaming) and its `usage`. Every event also carries `image_index` (which of the n images it belongs to)
and the completed one the image's `seed`; an image that fails sends an `error` event, after the other images'
events.

`ImagesRequest` is typed with the field types of `settings.ImageSettings`, so `/openapi.json` states the bounds the
route enforces. The route reads and checks the body itself (`read_images_request`) instead of letting FastAPI do
it: every bad value gets a 400 in OpenAI's error shape whose `param` is the field as the user wrote it and whose
message is one line (FastAPI's validation would name `body.seed` and echo pydantic's dump, and a 5000-digit number
would fail the JSON parse with no field at all). The OpenAPI entry is therefore declared by hand (`request_schema`),
with no 422.
"""

import json
import math
import re
import secrets
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from emu3_vllm.cfg_pairs import ImageSpec
from emu3_vllm.offline.items import GenerationDefaults, ItemError, image_spec
from emu3_vllm.settings import (
    DEFAULT_SIDE,
    INT64_MAX,
    MAX_PREVIEWS,
    MAX_SIDE,
    CfgScale,
    ImageCount,
    Prompt,
    Seed,
    SettingsError,
    Temperature,
    Text,
    TopK,
    check_grid,
    explain,
    show,
)

ROUTE = "/v1/images/generations"
WHERE = "request"
SIZE_PATTERN = r"^\s*(auto|\d+\s*[xX]\s*\d+)\s*$"
_SIZE = re.compile(r"\s*(?:auto|(\d+)\s*[xX]\s*(\d+))\s*")
MAX_PARTIAL_IMAGES = MAX_PREVIEWS  # OpenAI's bound

# --------------------------------------------------------------------------------------------------------------
# The request and response models

Size = Annotated[str, Field(strict=True, pattern=SIZE_PATTERN)]
Name = Annotated[str, Field(strict=True)]
Switch = Annotated[bool, Field(strict=True)]
PartialImages = Annotated[int, Field(strict=True, ge=0, le=MAX_PARTIAL_IMAGES)]
IGNORED = "OpenAI's; accepted and ignored"


class ImagesRequest(BaseModel):
    """The body of `POST /v1/images/generations`: OpenAI's Images API fields plus Emu3's (vllm-omni's names).

    Emu3's fields reuse `settings`' types, so the schema carries the bounds that are enforced. OpenAI's newer
    fields (`quality`, `style`, `output_format`, `background`, `output_compression`, `moderation`) are declared
    loosely typed (any JSON value) and ignored: PNG is the only output. Any other unknown field is ignored too
    (`extra="ignore"`), as on vLLM's own routes.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt = Field(description="What to draw (not blank).")
    n: ImageCount | None = Field(None, description="Images to generate (default 1); image i gets seed `seed + i`.")
    size: Size | None = Field(
        None, description='"WIDTHxHEIGHT" in pixels, each side rounded to a multiple of 8 (at least 2 tokens of '
                          f'8x8 pixels, at most {MAX_SIDE} per side), or "auto" (the default): the checkpoint\'s '
                          "own square image area, capped to what this server's max_model_len and KV cache fit.")
    response_format: Literal["b64_json"] | None = Field(None, description='Only "b64_json": images come inline.')
    model: Name | None = Field(None, description="The served model name; must match the server's.")
    seed: Seed | None = Field(None, description="Seed of the first image (drawn at random when left out).")
    guidance_scale: CfgScale | None = Field(None, description="Classifier-free guidance scale (Emu3's 3.0).")
    cfg_scale: CfgScale | None = Field(None, description="Another name for guidance_scale.")
    negative_prompt: Text | None = Field(None, description="The unguided half's prompt (Emu3's own by default).")
    top_k: TopK | None = Field(None, description="Top-k over the image codes; 0 or -1 for none (Emu3's 2048).")
    temperature: Temperature | None = Field(None, description="Sampling temperature; 0 is greedy (default 1).")
    stream: Switch | None = Field(None, description="true: answer with server-sent events, OpenAI's "
                                  "image_generation.partial_image and image_generation.completed.")
    partial_images: PartialImages | None = Field(None, description="With stream: previews per image while it is "
                                                 "drawn (default 0).")
    user: Name | None = Field(None, description="OpenAI's end-user id; accepted and ignored.")
    quality: Any = Field(None, description=IGNORED)
    style: Any = Field(None, description=IGNORED)
    output_format: Any = Field(None, description=IGNORED + " (the output is PNG)")
    background: Any = Field(None, description=IGNORED)
    output_compression: Any = Field(None, description=IGNORED)
    moderation: Any = Field(None, description=IGNORED)


class ImageData(BaseModel):
    b64_json: str | None = Field(description="The PNG, base64-encoded; null when this image failed.")
    seed: int = Field(description="The image's seed: the same request with it gives the same pixels.")
    error: str | None = Field(None, description="Why this image failed; present only then.")


class ImagesResponse(BaseModel):
    created: int
    size: str = Field(description='"WIDTHxHEIGHT" generated (each side a multiple of 8).')
    output_format: Literal["png"]
    data: list[ImageData]


# The streamed events: OpenAI's `image_generation.*` shapes (the `openai` SDK's ImageGenStreamEvent), plus
# `image_index` to tell the n images of a request apart.


class _StreamedImage(BaseModel):
    b64_json: str
    size: str
    output_format: Literal["png"] = "png"
    background: Literal["opaque"] = "opaque"
    quality: Literal["auto"] = "auto"
    created_at: int
    image_index: int = Field(description="Which of the request's n images this event belongs to.")


class PartialImageEvent(_StreamedImage):
    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int = Field(description="0-based: the preview's place among this image's previews.")


class InputTokensDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class CompletedEvent(_StreamedImage):
    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: Usage
    seed: int


class StreamError(BaseModel):
    message: str
    type: str = "InternalServerError"
    param: str | None = None
    code: int | None = None


class StreamErrorEvent(BaseModel):
    """An image of a streamed request that failed; sent after the other images' events."""

    type: Literal["error"] = "error"
    image_index: int
    seed: int
    error: StreamError


def usage(prompt_tokens: int, image_tokens: int) -> Usage:
    """OpenAI's usage of one image: the prompt tokens of its two CFG halves in, the image's tokens out."""
    return Usage(input_tokens=prompt_tokens, input_tokens_details=InputTokensDetails(text_tokens=prompt_tokens),
                 output_tokens=image_tokens, total_tokens=prompt_tokens + image_tokens)


def request_schema() -> dict:
    """`ImagesRequest`'s JSON schema as OpenAPI needs it."""
    return inlined_schema(ImagesRequest)


def stream_event_schema() -> dict:
    """One server-sent event of a streamed request as OpenAPI states it: its name, and its data, a JSON text of
    one of the event models."""
    events = [inlined_schema(model) for model in (PartialImageEvent, CompletedEvent, StreamErrorEvent)]
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string", "enum": [e["properties"]["type"]["const"] for e in events]},
                           "data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"oneOf": events}}}}


def inlined_schema(model) -> dict:
    """A model's JSON schema with any `$defs` inlined (the OpenAPI document has no `$defs` for them to point to)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def fix(node):
        if isinstance(node, list):
            return [fix(value) for value in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/$defs/"):
            return fix(defs[node["$ref"].rsplit("/", 1)[1]])
        return {key: fix(value) for key, value in node.items()}

    return fix(schema)


# --------------------------------------------------------------------------------------------------------------
# The request, checked without an engine


_LONG_DIGITS = 300  # below a float's 309


class _LongInt(int):
    """A JSON integer too long for a float (JSON has no bound; Python's int() stops at 4300 digits): past every
    field's bound, converts to an infinite float, and is quoted by its length."""

    digits: int

    def __new__(cls, text: str):
        negative = text.startswith("-")
        value = super().__new__(cls, -(10**_LONG_DIGITS) if negative else 10**_LONG_DIGITS)
        value.digits = len(text) - negative
        return value

    def __float__(self) -> float:
        return -math.inf if self < 0 else math.inf

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int:
    return int(text) if len(text) <= _LONG_DIGITS else _LongInt(text)


_TYPE_ERRORS = {"string_type": "must be a string", "bool_type": "must be true or false",
                "int_type": "must be an integer", "int_from_float": "must be an integer",
                "int_parsing": "must be an integer"}


def _request_error(exc: ValidationError, values: dict) -> ItemError:
    """The first problem of a request's validation as one line naming the field, quoting the value as sent."""
    first = exc.errors(include_url=False)[0]
    field = str(first["loc"][0]) if first["loc"] else None
    value = values.get(field)
    if field == "size":
        return ItemError(f'size must be "WIDTHxHEIGHT" in pixels (such as "512x512") or "auto", got '
                         f"{show(value)}", field)
    if field == "response_format":
        if value == "url":
            return ItemError('response_format "url" is not supported: this server returns images inline; use '
                             '"b64_json"', field)
        return ItemError(f'response_format must be "b64_json", got {show(value)}', field)
    if first["type"] in _TYPE_ERRORS:
        return ItemError(f"{field} {_TYPE_ERRORS[first['type']]}, got {show(value)}", field)
    message, got, _ = str(explain(exc)).partition(", got ")
    # The value as the user sent it (1e300, not its 301 digits), where settings quote the converted one.
    return ItemError(message + (f", got {show(value)}" if got and field in values else ""), field)


def read_images_request(body: bytes) -> ImagesRequest:
    """The request in a raw body, or an `ItemError` naming the field (None when the body as a whole is wrong).

    JSON is parsed here rather than by pydantic so that NaN reaches the field that refuses it and an integer of
    any length reaches its field's bound."""
    try:
        values = json.loads(body, parse_int=_parse_int)
    except RecursionError:
        raise ItemError("the request body is nested too deeply", None) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ItemError(f"the request body is not valid JSON: {str(exc)[:120]}", None) from None
    if not isinstance(values, dict):
        raise ItemError(f"the request body must be a JSON object, got {type(values).__name__} {show(values)}", None)
    try:
        return ImagesRequest.model_validate(values)
    except ValidationError as exc:
        raise _request_error(exc, values) from None


@dataclass(frozen=True)
class ImagesCall:
    specs: list[ImageSpec]  # image i of n
    size: str  # "WxH" actually generated (each side rounded to a multiple of 8)
    stream: bool = False
    partial_images: int = 0


def parse_size(value: Any, auto: tuple[int, int] = (DEFAULT_SIDE, DEFAULT_SIDE)) -> tuple[int, int]:
    """(height, width) in pixels from OpenAI's "WIDTHxHEIGHT"; "auto" or None is `auto` (height, width)."""
    if value is None:
        return auto
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ItemError(f'size must be "WIDTHxHEIGHT" in pixels (such as "512x512") or "auto", got {show(value)}',
                        "size")
    if match[1] is None:
        return auto
    # Digits past 9 are a size no engine holds; int() of thousands of them would be slow or refused.
    width, height = (int(text) if len(text) <= 9 else MAX_SIDE + 1 for text in (match[1], match[2]))
    if max(width, height) > MAX_SIDE:
        raise ItemError(f"size {show(value)}: each side must be at most {MAX_SIDE} pixels", "size")
    try:  # the settings' own rule for the smallest image, named by the request's field
        check_grid(height, width)
    except SettingsError as exc:
        raise ItemError(f"size {show(value)}: {exc}", "size") from None
    return height, width


def parse_images_request(request: ImagesRequest, *, auto_size: tuple[int, int] = (DEFAULT_SIDE, DEFAULT_SIDE),
                         draw_seed=lambda: secrets.randbits(31)) -> ImagesCall:
    """The image specs a validated request asks for, or an `ItemError` whose `field` is the request's field.

    `auto_size` is (height, width) for `size` "auto" or left out."""
    if request.partial_images is not None and not request.stream:
        raise ItemError("partial_images needs stream true: previews come as server-sent events", "partial_images")
    height, width = parse_size(request.size, auto_size)
    defaults = GenerationDefaults()
    scale = defaults.cfg_scale if request.guidance_scale is None else request.guidance_scale
    if request.cfg_scale is not None:
        if request.guidance_scale is not None and request.cfg_scale != request.guidance_scale:
            raise ItemError("cfg_scale is another name for guidance_scale; give one of them", "cfg_scale")
        scale = request.cfg_scale
    n = 1 if request.n is None else request.n
    seed = draw_seed() if request.seed is None else request.seed
    if seed + n - 1 > INT64_MAX:
        raise ItemError(f"seed must be <= {INT64_MAX - n + 1} for n {n} (image i gets seed + i, at most "
                        f"{INT64_MAX}), got {seed}", "seed")
    settings = replace(defaults, height=height, width=width, cfg_scale=scale, negative_prompt=defaults.negative_prompt
                       if request.negative_prompt is None else request.negative_prompt,
                       top_k=defaults.top_k if request.top_k is None else request.top_k,
                       temperature=defaults.temperature if request.temperature is None else request.temperature)
    # The offline API's own spec builder, so a request and `generate_images` with the same values agree.
    try:
        first = image_spec(request.prompt, where=WHERE, defaults=settings, seed=seed)
    except ItemError as exc:  # the request was validated with the same types: a guard, not a path
        field = "size" if exc.field in ("height", "width") else exc.field
        raise ItemError(str(exc).removeprefix(f"{WHERE}: "), field) from None
    specs = [replace(first, seed=seed + i) for i in range(n)]
    return ImagesCall(specs=specs, size=f"{first.width}x{first.height}", stream=bool(request.stream),
                      partial_images=request.partial_images or 0)
