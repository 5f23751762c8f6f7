"""`POST /v1/images/generations` on vLLM's OpenAI server: Emu3 text to image with classifier-free guidance.

A `vllm.endpoint_plugins` entry point (`emu3_vllm_images`), loaded by vLLM's API server when `VLLM_PLUGINS` names
it (`emu3-vllm serve` does). The request and response models, and the reading of a request into image specs, are
`images_protocol`'s; this module is the route, the service behind it and the plugin.

Every image is one CFG pair built by `cfg_pairs.pair_prompts` / `pair_sampling_params`; both halves go to the
engine client with the same `data_parallel_rank`, since vLLM's data-parallel balancer would otherwise place them
one by one. Finished code grids are VQ-decoded in batches on a worker thread (`vq_decode.DecodeBatcher`), PNG
encoding included, so the event loop never does either. A bad request is a 400 in OpenAI's error shape; an image
that fails in generation comes back in its place in `data` with an `error` saying why; a client that disconnects
gets both halves of its images aborted.

With `"stream": true` the route answers with server-sent events (`_events`): each image's conditional half streams
its new tokens (vLLM's DELTA outputs), a `previews.RowWatcher` says when each of the `partial_images` previews is
due, and the preview is decoded on the same batcher as the images, composed at the final size and sent as
`image_generation.partial_image`; then `image_generation.completed` carries the finished image. A request that
does not stream asks vLLM for final outputs only, as before.

The plugin also puts two kinds of client error on vLLM's own routes into OpenAI's error shape: a media URL in a
chat message that cannot be loaded (a `file://` URL the server may not read, an unreachable host) is a 400 rather
than vLLM's 500 (`media_error_handler`), and a body FastAPI cannot parse is a 400 in the shape vLLM's routes
declare rather than FastAPI's `{"detail": ...}` (`http_error_handler`).
"""

# No `from __future__ import annotations`: FastAPI reads the route's parameter annotations as objects.
import asyncio
import base64
import importlib.util
import io
import json
import logging
import math
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import Request

from emu3_vllm.cfg_pairs import (
    COND,
    UNCOND,
    ImageSpec,
    PairError,
    bare_prompt,
    pair_codes,
    pair_prompts,
    pair_sampling_params,
)
from emu3_vllm.layout import SPATIAL_FACTOR
from emu3_vllm.offline.items import GenerationDefaults, ItemError, image_spec
from emu3_vllm.serving.images_protocol import (
    ROUTE,
    WHERE,
    ImagesResponse,
    parse_images_request,
    read_images_request,
    request_schema,
    stream_event_schema,
)
from emu3_vllm.settings import MAX_SIDE, show

logger = logging.getLogger("emu3_vllm")

# An image's second and later previews are skipped while this many grids wait for the decoder: under load, previews
# would delay the images themselves (a preview is a VQ decode of the rows drawn so far), and OpenAI's stream may
# send an image's completed event before all of its partial images. The first preview always comes: it is the
# earliest sign of what is being drawn, and the cheapest to decode.
PREVIEW_BACKLOG = 1
# Prompt tokens the "auto" size leaves room for when a small max_model_len caps it.
AUTO_PROMPT_TOKENS = 32


# --------------------------------------------------------------------------------------------------------------
# The default size


def checkpoint_image_area(folder: str | Path) -> int:
    """The pixel area a checkpoint generates by default: `image_area` from its emu3_vllm.json (the checkpoints
    `make_random_checkpoint` writes), config.json (BAAI's original Emu3 configs) or processor config, else the
    default of transformers' `Emu3Processor` (518,400: 720x720)."""
    from transformers.models.emu3.processing_emu3 import Emu3ProcessorKwargs

    folder = Path(folder)
    for name in ("emu3_vllm.json", "config.json", "processor_config.json", "preprocessor_config.json"):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        for section in (config, config.get("image_processor"), config.get("images_kwargs")):
            area = section.get("image_area") if isinstance(section, dict) else None
            if isinstance(area, int) and not isinstance(area, bool) and area > 0:
                return area
    return Emu3ProcessorKwargs._defaults["images_kwargs"]["image_area"]


def auto_side(area: int, fits) -> int:
    """The side of the largest square of at most `area` pixels (as transformers' Emu3Processor rounds it, to a
    multiple of 8) for which `fits(side)`; the smallest image square (16) when none does."""
    side = max(2, min(round(math.sqrt(area) / SPATIAL_FACTOR), MAX_SIDE // SPATIAL_FACTOR)) * SPATIAL_FACTOR
    while side > 2 * SPATIAL_FACTOR and not fits(side):
        side -= SPATIAL_FACTOR
    return side


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
    from http import HTTPStatus

    from fastapi.responses import JSONResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    error = create_error_response(message, err_type=kind, status_code=HTTPStatus(status), param=field)
    return JSONResponse(content=error.model_dump(), status_code=status)


def _passes_through(exc: BaseException) -> bool:
    """Errors vLLM's own handlers answer (a 4xx the client caused, or a dead engine), not an image's failure."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, (VLLMClientError, GracefulHTTPError, EngineDeadError))


def _image_error(index: int, exc: Exception) -> str:
    """Why image `index` of a request failed, as its `data` entry or its error event says."""
    from emu3_vllm.offline.vq_decode import DecodeError

    if isinstance(exc, DecodeError):
        return f"image {index}: {exc}"
    if isinstance(exc, PairError):
        return f"image {index}: generation failed: {exc}"
    return f"image {index}: generation failed: {type(exc).__name__}: {exc}"


def _sse(event: dict) -> str:
    """One server-sent event, named by its type as OpenAI names its image events."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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

        from emu3_vllm.cfg_pairs import PromptTokens
        from emu3_vllm.layout import ImageTokenIds
        from emu3_vllm.offline.items import EngineLimits
        from emu3_vllm.offline.vq_decode import DecodeBatcher, VQDecoder

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
        area = checkpoint_image_area(checkpoint)
        side = auto_side(area, self._auto_fits)
        self.auto_size = (side, side)
        logger.info("images: size \"auto\" is %dx%d (the checkpoint's image area is %d pixels; max_model_len %d, "
                    "%s KV blocks)", side, side, area, self.limits.max_model_len, self.limits.kv_blocks)
        # torch's own thread count, as in the offline API: a CPU decode's pixels depend on how many threads sum
        # its convolutions, and an image must equal the offline one to the pixel.
        self.decoder = DecodeBatcher(VQDecoder(checkpoint).decode, postprocess=png_b64)
        if not self.limits.pair_scheduler:
            logger.warning("scheduler %s is not emu3_vllm's pair-aware scheduler: CFG pairs may fall out of lockstep "
                           "(such images fail with an error)", config.scheduler_config.scheduler_cls)

    def _prompt_lengths(self, spec: ImageSpec) -> tuple[int, int, int]:
        """Tokens of the pair's prompts, and of a prompt with no text (BOS and the image header)."""
        cond, uncond = pair_prompts(spec, self.tokens)
        return len(self._encode(cond)), len(self._encode(uncond)), len(self._encode(bare_prompt(spec, self.tokens)))

    def _auto_fits(self, side: int) -> bool:
        """Whether a side x side image fits this server with Emu3's negative prompt and a short prompt."""
        spec = image_spec("-", where=WHERE, defaults=GenerationDefaults(height=side, width=side), seed=0)
        cond_len, uncond_len, bare_len = self._prompt_lengths(spec)
        try:
            self.limits.check_image(WHERE, cond_len + AUTO_PROMPT_TOKENS, uncond_len, spec.num_tokens, side, side,
                                    bare_len=bare_len)
        except ItemError:
            return False
        return True

    async def create(self, body: bytes) -> Any:
        from fastapi.responses import JSONResponse

        try:
            request = read_images_request(body)
        except ItemError as exc:
            return error_response(str(exc), exc.field)
        if request.model is not None and not self.served_models.is_base_model(request.model):
            names = ", ".join(m.name for m in self.served_models.base_model_paths)
            return error_response(f"The model `{show(request.model)[1:-1]}` does not exist. Valid aliases: {names}.",
                                  "model", 404)
        try:
            call = parse_images_request(request, auto_size=self.auto_size)
            prompt_tokens = await self._check_fits(call.specs[0])  # the n images share their prompts
        except ItemError as exc:
            return error_response(str(exc).removeprefix(f"{WHERE}: "), exc.field)
        request_id = f"img-{uuid.uuid4().hex}"
        if call.stream:
            from fastapi.responses import StreamingResponse

            return StreamingResponse(self._events(call, request_id, prompt_tokens), media_type="text/event-stream")
        # What escapes an image (vLLM's 4xx errors, a dead engine) goes to vLLM's exception handlers.
        data = await all_or_none(self._image(i, spec, f"{request_id}-{i}") for i, spec in enumerate(call.specs))
        return JSONResponse(content={"created": int(time.time()), "size": call.size, "output_format": "png",
                                     "data": data})

    async def _check_fits(self, spec: ImageSpec) -> int:
        """An `ItemError` if the image cannot run on this server; else the prompt tokens of its two halves."""
        cond_len, uncond_len, bare_len = await asyncio.to_thread(self._prompt_lengths, spec)
        self.limits.check_image(WHERE, cond_len, uncond_len, spec.num_tokens, spec.height, spec.width,
                                bare_len=bare_len)
        return cond_len + uncond_len

    async def _image(self, index: int, spec: ImageSpec, pair_id: str) -> dict:
        """`data[index]`: the image, or why it failed."""
        entry: dict[str, Any] = {"b64_json": None, "seed": spec.seed}
        try:
            codes = await self._pair(spec, pair_id)
            entry["b64_json"] = await asyncio.wrap_future(self.decoder.submit(codes))
            return entry
        except Exception as exc:  # noqa: BLE001 - one image's failure is reported in its place
            if _passes_through(exc):
                raise
            entry["error"] = _image_error(index, exc)
        logger.warning("%s %s", pair_id, entry["error"])
        return entry
    async def _pair(self, spec: ImageSpec, pair_id: str, on_tokens=None) -> list[list[int]]:
        """Both halves of one image on one engine; whatever stops this early aborts the halves still running.
        `on_tokens(new_tokens)` is called as the conditional half generates, when given."""
        from vllm.sampling_params import RequestOutputKind

        prompts = pair_prompts(spec, self.tokens)
        params = pair_sampling_params(spec, pair_id)
        request_ids = (f"{pair_id}-{COND}", f"{pair_id}-{UNCOND}")
        finished: dict[str, list[int]] = {}
        rank = self.ranks.acquire()
        watchers = (on_tokens, None)
        for half_params, watch in zip(params, watchers):
            # Only a half someone watches streams its tokens; otherwise the route needs the last output only.
            half_params.output_kind = RequestOutputKind.FINAL_ONLY if watch is None else RequestOutputKind.DELTA
        try:
            await all_or_none(self._half(text, half_params, request_id, rank, finished, watch)
                              for text, half_params, request_id, watch in zip(prompts, params, request_ids, watchers))
        finally:
            self.ranks.release(rank)
            running = [request_id for request_id in request_ids if request_id not in finished]
            if running:  # a half that failed to submit would otherwise wait for its twin for ever
                await asyncio.shield(self.engine.abort(running))
        return pair_codes(finished[request_ids[0]], finished[request_ids[1]], spec.h, spec.w, self.token_ids)

    async def _half(self, text: str, params, request_id: str, rank: int | None, finished: dict,
                    on_tokens=None) -> None:
        last = None
        tokens: list[int] = []  # a watched half's DELTA outputs each carry its new tokens
        async for output in self.engine.generate({"prompt": text}, params, request_id, data_parallel_rank=rank):
            last = output
            if on_tokens is not None:
                tokens.extend(output.outputs[0].token_ids)
                on_tokens(output.outputs[0].token_ids)
        if last is None or not last.finished:
            raise PairError(f"the engine ended request {request_id} without a result")
        finished[request_id] = tokens if on_tokens is not None else list(last.outputs[0].token_ids)

    # ----------------------------------------------------------------------------------------------------------
    # Streaming

    async def _events(self, call, request_id: str, prompt_tokens: int):
        """The server-sent events of a streamed request: every image's events as they happen; an image's error
        comes after the other images' events, since OpenAI's SDK stops reading at an error."""
        events: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._streamed_image(i, spec, f"{request_id}-{i}", call, prompt_tokens, events))
                 for i, spec in enumerate(call.specs)]
        errors = []
        try:
            running = len(tasks)
            while running:
                event = await events.get()
                if event is None:
                    running -= 1
                elif event["type"] == "error":
                    errors.append(event)
                else:
                    yield _sse(event)
            for event in errors:
                yield _sse(event)
        finally:  # the client went away, or the stream ended: nothing of this request stays in the engine
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _streamed_image(self, index: int, spec: ImageSpec, pair_id: str, call, prompt_tokens: int,
                              events: asyncio.Queue) -> None:
        from emu3_vllm.offline.previews import RowWatcher, compose
        from emu3_vllm.offline.vq_decode import DecodeError
        from emu3_vllm.serving.images_protocol import (
            CompletedEvent,
            PartialImageEvent,
            StreamError,
            StreamErrorEvent,
            usage,
        )

        previews: list[asyncio.Task] = []  # each sends one preview's event, after the one before it
        preview_decodes: list = []  # their decode futures

        async def send_preview(future, preview_index: int, before: asyncio.Task | None) -> None:
            try:
                b64 = await asyncio.wrap_future(future)
            except DecodeError as exc:  # a preview is only a view: the image reports its own failure
                logger.warning("%s preview %d: %s", pair_id, preview_index, exc)
                b64 = None
            except asyncio.CancelledError:
                if not future.cancelled():
                    raise
                b64 = None  # dropped: the image was complete before the decoder reached this preview
            if before is not None:
                await before  # an image's previews go out in order
            if b64 is not None:
                await events.put(PartialImageEvent(b64_json=b64, size=call.size, created_at=int(time.time()),
                                                   image_index=index, partial_image_index=preview_index).model_dump())

        def on_tokens(new_tokens) -> None:
            for preview_index, _, grid in watcher.feed(new_tokens):
                if preview_decodes and self.decoder.waiting >= PREVIEW_BACKLOG:
                    continue  # the decoder is behind: images first (OpenAI allows fewer partial images)
                future = self.decoder.submit(grid, lambda image: png_b64(compose(image, spec.height, spec.width)))
                preview_decodes.append(future)
                previews.append(asyncio.create_task(send_preview(future, preview_index,
                                                                 previews[-1] if previews else None)))

        watcher = RowWatcher(spec.h, spec.w, call.partial_images, self.token_ids) if call.partial_images else None
        try:
            codes = await self._pair(spec, pair_id, on_tokens if watcher is not None else None)
            # A preview the decoder has not started is stale now: OpenAI's stream may send the completed image
            # before all its partial images, and under load this keeps previews from slowing images down.
            for future in preview_decodes:
                future.cancel()
            b64 = await asyncio.wrap_future(self.decoder.submit(codes))
            if previews:
                await previews[-1]
            await events.put(CompletedEvent(b64_json=b64, size=call.size, created_at=int(time.time()),
                                            image_index=index, seed=spec.seed,
                                            usage=usage(prompt_tokens, spec.num_tokens)).model_dump())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one image's failure is its own error event (headers are sent)
            message = _image_error(index, exc)
            logger.warning("%s %s", pair_id, message)
            await events.put(StreamErrorEvent(image_index=index, seed=spec.seed,
                                              error=StreamError(message=message)).model_dump())
        finally:
            for task in previews:
                task.cancel()
            await events.put(None)


# --------------------------------------------------------------------------------------------------------------
# Media URLs on vLLM's chat route

# The modules that fetch and decode a media URL from a chat message: an OSError or RuntimeError raised inside them
# is about the URL the client sent (vLLM raises RuntimeError for a file:// URL without --allowed-local-media-path
# and lets aiohttp's connection errors, OSErrors, through as "transient"), yet vLLM answers both with a 500.
_MEDIA_MODULES = ("vllm.multimodal.media", "vllm.connections", "emu3_vllm.image_loading")
_MEDIA_PARAMS = {"fetch_image": "image_url", "fetch_audio": "audio_url", "fetch_video": "video_url"}


def media_error(exc: BaseException) -> tuple[str, str | None] | None:
    """(message, param) when `exc` was raised loading a media URL a request gave, else None."""
    param, inside = None, False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        inside = inside or str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_MEDIA_MODULES)
        param = param or next((name for prefix, name in _MEDIA_PARAMS.items() if code.co_name.startswith(prefix)),
                              None)
        tb = tb.tb_next
    if not inside:
        return None
    return f"cannot load the {param or 'media URL'}: {str(exc) or type(exc).__name__}", param


async def media_error_handler(request: Request, exc: Exception):
    """A 400 for a media URL the server cannot load; anything else goes to vLLM's own handler, as before."""
    from vllm.entrypoints.serve.exception_handling.handlers.exception import exception_handler

    found = media_error(exc)
    if found is not None:
        return error_response(*found)
    # Under vLLM's catch-all `Exception` handler the server logged these with their traceback; keep that.
    logger.error("Exception in %s %s", request.method, request.url.path, exc_info=exc)
    return await exception_handler(request, exc)


async def http_error_handler(request: Request, exc: Exception):
    """Starlette's HTTPException in OpenAI's error shape, by vLLM's own handler.

    vLLM registers that handler for FastAPI's subclass only, while FastAPI raises Starlette's class for a body it
    cannot parse (bytes that are not UTF-8, an integer of over 4300 digits): those came back as FastAPI's
    `{"detail": ...}`, which is not the error shape vLLM's routes declare."""
    from fastapi.exception_handlers import http_exception_handler as fastapi_handler
    from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler

    if exc.status_code < 400:  # 304 and the like carry no error body
        return await fastapi_handler(request, exc)
    response = await http_exception_handler(request, exc)
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow
    return response


# --------------------------------------------------------------------------------------------------------------
# The plugin


async def _request_body(raw_request: Request) -> bytes:
    # Read in a dependency: `with_cancellation` starts listening for a disconnect as the handler starts, and would
    # take the body's messages for its own.
    return await raw_request.body()


class ImagesPlugin:
    """The `vllm.endpoint_plugins` entry point (vLLM calls the class with no arguments)."""

    name = "emu3_vllm_images"
    required_tasks = ("generate",)  # not on vLLM's engine-less render server

    def attach_router(self, app) -> None:
        from fastapi import Depends
        from starlette.exceptions import HTTPException
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.utils.api_utils import load_aware_call, validate_json_request, with_cancellation

        errors = {"model": ErrorResponse}
        # JSON, or with `stream` server-sent events (`image_generation.partial_image` / `.completed` events).
        ok = {"model": ImagesResponse, "content": {"text/event-stream": {"schema": stream_event_schema()}}}
        openapi = {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema()}}}}

        @app.post(ROUTE, dependencies=[Depends(validate_json_request)], response_model=None, openapi_extra=openapi,
                  summary="Create images", responses={200: ok, 400: errors, 404: errors})
        @with_cancellation
        @load_aware_call
        async def create_images(raw_request: Request, body: bytes = Depends(_request_body)):
            service = getattr(raw_request.app.state, "emu3_images", None)
            if service is None:
                return error_response("image generation is not available on this server", None, 500)
            return await service.create(body)

        app.add_exception_handler(HTTPException, http_error_handler)
        for exc_type in (OSError, RuntimeError):
            app.add_exception_handler(exc_type, media_error_handler)
        try:
            from aiohttp import ClientError
        except ImportError:  # pragma: no cover - vLLM depends on aiohttp
            pass
        else:
            app.add_exception_handler(ClientError, media_error_handler)

    async def init_state(self, engine_client, state, args) -> None:
        # Chat images go through our loader where it exists (another module; this one must not depend on it).
        if importlib.util.find_spec("emu3_vllm.image_loading") is not None:
            from emu3_vllm import image_loading

            if hasattr(image_loading, "use_for_vllm_media"):
                image_loading.use_for_vllm_media()
        if engine_client is None:
            return
        state.emu3_images = await asyncio.to_thread(ImagesService, engine_client, state.openai_serving_models)
