"""`POST /v1/images/generations` on vLLM's OpenAI server: Emu3 text to image with classifier-free guidance.

A `vllm.endpoint_plugins` entry point (`emu3_vllm_images`), loaded by vLLM's API server when `VLLM_PLUGINS` names
it (`emu3-vllm serve` does). The request has the OpenAI Images API shape, with Emu3's settings at the top level
(where the OpenAI SDK's `extra_body` puts them):

    {"prompt": "a red emu", "n": 2, "size": "512x512", "response_format": "b64_json", "model": "...",
     "seed": 7, "guidance_scale": 3.0, "negative_prompt": "...", "top_k": 2048, "temperature": 1.0}
    -> {"created": 1700000000, "size": "512x512", "output_format": "png",
        "data": [{"b64_json": "...", "seed": 7}, {"b64_json": "...", "seed": 8}]}

Image i of n gets seed `seed + i`, so each image equals `Emu3.generate_images` offline with that seed. Every image
is one CFG pair built by the request protocol (`protocol.pair_prompts` / `pair_sampling_params`); both halves go to
the engine client with the same `data_parallel_rank`, since vLLM's data-parallel balancer would otherwise place
them one by one. Finished code grids are VQ-decoded in batches on a worker thread (`async_decode`).

Every bad value gets a 400 in OpenAI's error shape naming its field; an image that fails in generation comes back
in its place in `data` with an `error` saying why; a client that disconnects gets both halves of its images
aborted.
"""

# No `from __future__ import annotations`: FastAPI reads the route's parameter annotations as objects.
import asyncio
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from .inputs import GenerationDefaults, ItemError, image_grid, image_spec, integer_value, number_value, text_value
from .protocol import COND, UNCOND, ImageSpec, PairError, pair_codes, pair_prompts, pair_sampling_params

logger = logging.getLogger("emu3_vllm")

ROUTE = "/v1/images/generations"
MAX_IMAGES = 10  # per request (`n`), as vllm-omni's images route allows
WHERE = "request"
_SIZE = re.compile(r"\s*([-+]?\d+)\s*[xX]\s*([-+]?\d+)\s*")


class ImagesRequest(BaseModel):
    """Every field takes any JSON value: the handler checks each one, so a bad one is a 400 naming it rather than a
    schema error (malformed JSON is still rejected by vLLM's request validation). Unknown fields are ignored, as on
    vLLM's other routes."""

    model_config = ConfigDict(extra="ignore")

    prompt: Any = None
    model: Any = None
    n: Any = None
    size: Any = None
    response_format: Any = None
    user: Any = None
    seed: Any = None
    guidance_scale: Any = None
    cfg_scale: Any = None  # alias of guidance_scale
    negative_prompt: Any = None
    top_k: Any = None
    temperature: Any = None


# --------------------------------------------------------------------------------------------------------------
# The request, checked without an engine


@dataclass(frozen=True)
class ImagesCall:
    specs: list[ImageSpec]  # image i of n
    size: str  # "WxH" actually generated (each side rounded to a multiple of 8)


def parse_size(value: Any) -> tuple[int, int]:
    """(height, width) in pixels from OpenAI's "WIDTHxHEIGHT"; "auto" or None is Emu3's default 720x720."""
    defaults = GenerationDefaults()
    if value is None or value == "auto":
        return defaults.height, defaults.width
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ItemError(f"{WHERE}: size must be \"WIDTHxHEIGHT\" in pixels, such as \"720x720\", got "
                        f"{value!r:.60}", "size")
    width, height = int(match[1]), int(match[2])
    if width <= 0 or height <= 0:
        raise ItemError(f"{WHERE}: size must be positive on both sides, got {value!r:.60}", "size")
    try:
        image_grid(height, width, WHERE)
    except ItemError as exc:
        raise ItemError(str(exc), "size") from exc
    return height, width


def parse_images_request(body: ImagesRequest, *, max_images: int = MAX_IMAGES,
                         draw_seed=lambda: secrets.randbits(31)) -> ImagesCall:
    """The image specs a request asks for, or an `ItemError` whose `field` is the offending request field."""
    if body.prompt is None:
        raise ItemError(f"{WHERE}: prompt is required", "prompt")
    prompt = text_value(body.prompt, "prompt", WHERE)
    n = 1 if body.n is None else integer_value(body.n, "n", WHERE, minimum=1)
    if n > max_images:
        raise ItemError(f"{WHERE}: n must be at most {max_images}, got {n}", "n")
    if body.response_format not in (None, "b64_json"):
        if body.response_format == "url":
            raise ItemError(f"{WHERE}: response_format \"url\" is not supported: this server returns images "
                            "inline; use \"b64_json\"", "response_format")
        raise ItemError(f"{WHERE}: response_format must be \"b64_json\", got {body.response_format!r:.60}",
                        "response_format")
    height, width = parse_size(body.size)
    defaults = GenerationDefaults()
    scale = defaults.cfg_scale
    for field in ("guidance_scale", "cfg_scale"):
        value = getattr(body, field)
        if value is not None:
            value = number_value(value, field, WHERE, positive=True)
            if field == "cfg_scale" and body.guidance_scale is not None and value != scale:
                raise ItemError(f"{WHERE}: cfg_scale is another name for guidance_scale; give one of them",
                                "cfg_scale")
            scale = value
    negative = defaults.negative_prompt if body.negative_prompt is None else text_value(
        body.negative_prompt, "negative_prompt", WHERE, allow_empty=True)
    top_k = defaults.top_k if body.top_k is None else integer_value(body.top_k, "top_k", WHERE)
    temperature = defaults.temperature if body.temperature is None else number_value(
        body.temperature, "temperature", WHERE, minimum=0.0)
    seed = draw_seed() if body.seed is None else integer_value(body.seed, "seed", WHERE)
    # The offline API's own spec builder, so a request and `generate_images` with the same values agree.
    settings = replace(defaults, height=height, width=width, cfg_scale=scale, negative_prompt=negative,
                       top_k=top_k, temperature=temperature)
    specs = [image_spec(prompt, where=f"image {i}", defaults=settings, seed=seed + i) for i in range(n)]
    return ImagesCall(specs=specs, size=f"{specs[0].width}x{specs[0].height}")


# --------------------------------------------------------------------------------------------------------------
# Data parallelism


def choose_rank(pairs_in_flight: list[int], engine_counts: list | None, start: int) -> int:
    """The data-parallel engine for the next pair: the least loaded, scanning from `start` so that ties rotate.

    An engine's load is the greater of the requests this server has there (two per pair) and, when known, the
    waiting + running requests vLLM's coordinator last reported for it (which also counts chat requests and other
    API servers' work).
    """
    n = len(pairs_in_flight)
    best, best_load = start % n, None
    for i in range(n):
        rank = (start + i) % n
        load = 2 * pairs_in_flight[rank]
        if engine_counts is not None:
            load = max(load, engine_counts[rank][0] + engine_counts[rank][1])
        if best_load is None or load < best_load:
            best, best_load = rank, load
    return best


class RankChooser:
    """Picks one data-parallel rank per CFG pair and counts the pairs it placed until they are released."""

    def __init__(self, engines: int, engine_counts=lambda: None):
        self.pairs_in_flight = [0] * engines
        self._engine_counts = engine_counts
        self._start = 0

    def acquire(self) -> int | None:
        """A rank for the next pair, or None with a single engine (nothing to choose)."""
        n = len(self.pairs_in_flight)
        if n <= 1:
            return None
        counts = self._engine_counts()
        if counts is not None and len(counts) != n:
            counts = None
        rank = choose_rank(self.pairs_in_flight, counts, self._start)
        self._start = (rank + 1) % n
        self.pairs_in_flight[rank] += 1
        return rank

    def release(self, rank: int | None) -> None:
        if rank is not None:
            self.pairs_in_flight[rank] -= 1


def engines_reached(parallel_config) -> int:
    """Data-parallel engines this API server submits to (the range vLLM checks `data_parallel_rank` against)."""
    if parallel_config.local_engines_only:
        return parallel_config.data_parallel_size_local or 1
    return parallel_config.data_parallel_size or 1


def _coordinator_counts(engine_client):
    """vLLM's data-parallel client's latest per-engine (waiting, running, ...) snapshot, where it keeps one."""
    counts = getattr(getattr(engine_client, "engine_core", None), "lb_engines", None)
    try:
        return [(int(c[0]), int(c[1])) for c in counts] if counts else None
    except (TypeError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------------------
# The route


async def all_or_none(coroutines) -> list:
    """Their results, run concurrently; the first exception cancels the others, waits for them and is raised (the
    rule of Python 3.11's TaskGroup, without its exception groups)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def error_response(message: str, field: str | None, status: int = 400):
    from fastapi.responses import JSONResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    from http import HTTPStatus

    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    error = create_error_response(message, err_type=kind, status_code=HTTPStatus(status), param=field)
    return JSONResponse(content=error.model_dump(), status_code=status)


def _passes_through(exc: BaseException) -> bool:
    """Errors vLLM's own handlers answer (a 4xx the client caused, or a dead engine), not an image's failure."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, (VLLMClientError, GracefulHTTPError, EngineDeadError))


def _local_checkpoint(model: str, revision: str | None) -> str:
    """A folder holding the checkpoint: the model path itself, or the hub snapshot vLLM loaded it from."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])


class ImagesService:
    """What the route needs from the running server, built once when the server starts."""

    def __init__(self, engine_client, served_models):
        from transformers import AutoTokenizer

        from .async_decode import AsyncDecoder
        from .engine import EngineLimits
        from .layout import ImageTokenIds
        from .protocol import PromptTokens
        from .vq import VQDecoder

        config = engine_client.vllm_config
        model = config.model_config
        self.engine = engine_client
        self.served_models = served_models
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, revision=model.tokenizer_revision,
                                                  trust_remote_code=model.trust_remote_code)
        self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self.tokens = PromptTokens.from_tokenizer(tokenizer)
        self.token_ids = ImageTokenIds.from_tokenizer(tokenizer)
        engines = engines_reached(config.parallel_config)
        limits = EngineLimits.of(config)
        # The API server sees the KV blocks of all its engines summed; a pair runs on one of them.
        self.limits = replace(limits, kv_blocks=limits.kv_blocks // engines if limits.kv_blocks else limits.kv_blocks)
        self.ranks = RankChooser(engines, lambda: _coordinator_counts(engine_client))
        checkpoint = _local_checkpoint(model.model, model.revision)
        # torch's own thread count, as in the offline API: a CPU decode's pixels depend on how many threads sum
        # its convolutions, and an image must equal the offline one to the pixel.
        self.decoder = AsyncDecoder(VQDecoder(checkpoint).decode)
        if not self.limits.pair_scheduler:
            logger.warning("scheduler %s is not emu3_vllm's pair-aware scheduler: CFG pairs may fall out of lockstep "
                           "(such images fail with an error)", config.scheduler_config.scheduler_cls)

    async def create(self, request) -> Any:
        from fastapi.responses import JSONResponse

        if request.model is not None and not (isinstance(request.model, str) and
                                              self.served_models.is_base_model(request.model)):
            names = ", ".join(m.name for m in self.served_models.base_model_paths)
            return error_response(f"The model `{request.model}` does not exist. Valid aliases: {names}.", "model",
                                  404)
        try:
            call = parse_images_request(request)
            await self._check_fits(call.specs[0])
        except ItemError as exc:
            return error_response(str(exc).removeprefix(f"{WHERE}: "), exc.field)
        request_id = f"img-{uuid.uuid4().hex}"
        # What escapes an image (vLLM's 4xx errors, a dead engine) goes to vLLM's exception handlers.
        data = await all_or_none(self._image(i, spec, f"{request_id}-{i}") for i, spec in enumerate(call.specs))
        return JSONResponse(content={"created": int(time.time()), "size": call.size, "output_format": "png",
                                     "data": data})

    async def _check_fits(self, spec: ImageSpec) -> None:
        cond, uncond = pair_prompts(spec, self.tokens)
        cond_len, uncond_len = await asyncio.to_thread(lambda: (len(self._encode(cond)), len(self._encode(uncond))))
        self.limits.check_image(WHERE, cond_len, uncond_len, spec.num_tokens, spec.height, spec.width)

    async def _image(self, index: int, spec: ImageSpec, pair_id: str) -> dict:
        """`data[index]`: the image, or why it failed."""
        from .async_decode import DecodeError

        entry: dict[str, Any] = {"b64_json": None, "seed": spec.seed}
        try:
            codes = await self._pair(spec, pair_id)
            entry["b64_json"] = await self.decoder.encode(codes)
            return entry
        except PairError as exc:
            entry["error"] = f"image {index}: generation failed: {exc}"
        except DecodeError as exc:
            entry["error"] = f"image {index}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one image's failure is reported in its place
            if _passes_through(exc):
                raise
            entry["error"] = f"image {index}: generation failed: {type(exc).__name__}: {exc}"
        logger.warning("%s %s", pair_id, entry["error"])
        return entry

    async def _pair(self, spec: ImageSpec, pair_id: str) -> list[list[int]]:
        """Both halves of one image on one engine; whatever stops this early aborts the halves still running."""
        from vllm.sampling_params import RequestOutputKind

        prompts = pair_prompts(spec, self.tokens)
        params = pair_sampling_params(spec, pair_id)
        request_ids = (f"{pair_id}-{COND}", f"{pair_id}-{UNCOND}")
        finished: dict[str, list[int]] = {}
        rank = self.ranks.acquire()
        for half_params in params:
            half_params.output_kind = RequestOutputKind.FINAL_ONLY  # the route needs the last output only
        try:
            await all_or_none(self._half(text, half_params, request_id, rank, finished)
                              for text, half_params, request_id in zip(prompts, params, request_ids))
        finally:
            self.ranks.release(rank)
            running = [request_id for request_id in request_ids if request_id not in finished]
            if running:  # a half that failed to submit would otherwise wait for its twin for ever
                await asyncio.shield(self.engine.abort(running))
        return pair_codes(finished[request_ids[0]], finished[request_ids[1]], spec.h, spec.w, self.token_ids)

    async def _half(self, text: str, params, request_id: str, rank: int | None, finished: dict) -> None:
        last = None
        async for output in self.engine.generate({"prompt": text}, params, request_id, data_parallel_rank=rank):
            last = output
        if last is None or not last.finished:
            raise PairError(f"the engine ended request {request_id} without a result")
        finished[request_id] = list(last.outputs[0].token_ids)


class ImagesPlugin:
    """The `vllm.endpoint_plugins` entry point (vLLM calls the class with no arguments)."""

    name = "emu3_vllm_images"
    required_tasks = ("generate",)  # not on vLLM's engine-less render server

    def attach_router(self, app) -> None:
        from fastapi import Depends
        from vllm.entrypoints.serve.utils.api_utils import load_aware_call, validate_json_request, with_cancellation

        # A pydantic body, so the request is read before `with_cancellation` starts listening for a disconnect.
        @app.post(ROUTE, dependencies=[Depends(validate_json_request)])
        @with_cancellation
        @load_aware_call
        async def create_images(request: ImagesRequest, raw_request: Request):
            service = getattr(raw_request.app.state, "emu3_images", None)
            if service is None:
                return error_response("image generation is not available on this server", None, 500)
            return await service.create(request)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        state.emu3_images = await asyncio.to_thread(ImagesService, engine_client, state.openai_serving_models)
