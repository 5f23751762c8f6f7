"""The streaming core under every image front end: keep the engine full, hand back each image as its pair finishes.

`ImageStream.run` takes (index, prompt, spec or error) items lazily, keeps up to `max_in_flight` images' request pairs
submitted (so the pair scheduler always has a waiting pair to start when one finishes), steps the engine itself, and
yields `(index, GeneratedImage)` as soon as an image is done; finished code grids are VQ-decoded in small batches on a
background thread while the engine keeps stepping (no more than a window's worth of images, or two batches, wait for it:
beyond that, decode is the bottleneck and new prompts wait). Bad items come back as errors naming their index and never
reach the engine. Whatever ends the stream early (the consumer stops iterating, an exception, Ctrl-C) aborts every
request this stream still has in the engine, so the engine is left as it was. An engine that is one data-parallel rank
under vLLM's external launcher steps in lockstep with the other ranks (`DataParallelLockstep`).

With `previews=k`, each image is also yielded k times as an `ImagePreview` while it is drawn (see `previews`): the
conditional half then streams its tokens to this loop (vLLM's DELTA outputs), and previews decode on the same
batcher as the images. A stream without previews asks vLLM for final outputs only, as before.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from emu3_vllm.cfg_pairs import (
    COND,
    UNCOND,
    ImageSpec,
    PairError,
    PromptTokens,
    bare_prompt,
    pair_codes,
    pair_prompts,
    pair_sampling_params,
)
from emu3_vllm.layout import ImageTokenIds
from emu3_vllm.offline.items import EngineLimits, ItemError
from emu3_vllm.offline.previews import ImagePreview, RowWatcher, compose
from emu3_vllm.offline.results import GeneratedImage
from emu3_vllm.offline.stepping import DataParallelLockstep, abort

logger = logging.getLogger("emu3_vllm")

_stream_ids = itertools.count()


@dataclass
class _Pair:
    index: int
    result: GeneratedImage
    request_ids: list[str]  # vLLM's internal ids, for aborting
    outputs: dict[str, Any] = field(default_factory=dict)
    watcher: RowWatcher | None = None  # the conditional half's tokens so far, when previews are asked for


@dataclass
class StreamStats:
    """What one stream did, for progress displays and benchmarks."""

    submitted: int = 0
    finished: int = 0
    failed: int = 0
    engine_steps: int = 0  # engine steps while this stream had requests in the engine
    image_tokens: int = 0  # tokens of the images that finished (each half decodes them once)
    max_in_engine: int = 0  # most images this stream had in the engine at once
    decode_seconds: float = 0.0  # VQ decode time on the background thread
    started: float = field(default_factory=time.perf_counter)

    @property
    def mean_pairs_per_step(self) -> float:
        """Pairs decoding per engine step, on average: every running pair advances one token per step."""
        return self.image_tokens / self.engine_steps if self.engine_steps else 0.0


class ImageStream:
    """One pass of image specs through an engine; see the module docstring."""

    def __init__(self, llm, *, tokens: PromptTokens, token_ids: ImageTokenIds, limits: EngineLimits,
                 prompt_len: Callable[[str], int], max_in_flight: int, decoder=None, decode_batch: int = 1,
                 previews: int = 0):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if previews and decoder is None:
            raise ValueError("previews are decoded images: they need decode=True")
        self.llm = llm
        self.tokens = tokens
        self.token_ids = token_ids
        self.limits = limits
        self.prompt_len = prompt_len
        self.max_in_flight = max_in_flight
        self.decoder = decoder
        self.decode_batch = decode_batch
        self.previews = previews
        self.stats = StreamStats()
        self._name = f"s{next(_stream_ids)}"

    def run(self, items: Iterable[tuple[int, Any, ImageSpec | ItemError]]
            ) -> Iterator[tuple[int, GeneratedImage | ImagePreview]]:
        source = iter(items)
        exhausted = False
        in_flight: dict[str, _Pair] = {}  # pair id -> pair
        by_request: dict[str, tuple[str, str]] = {}  # vLLM request id (as outputs carry it) -> (pair id, role)
        ready: deque[tuple[int, GeneratedImage]] = deque()
        worker = _Decodes(self.decoder.decode, self.decode_batch) if self.decoder is not None else None
        engine = self.llm.llm_engine
        lockstep = DataParallelLockstep.of(self.llm)
        backlog = max(2 * self.decode_batch, self.max_in_flight)  # images decoded or waiting for the decoder
        try:
            while True:
                # Top up the engine; a decode backlog holds new work back, since decode is then the bottleneck.
                while not exhausted and len(in_flight) < self.max_in_flight and (
                        worker is None or worker.pending + len(ready) < backlog):
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                    else:
                        self._submit(*item, in_flight, by_request, ready)
                if worker is not None:
                    ready.extend(worker.done())
                while ready:
                    index, result = ready.popleft()
                    self._count(result)
                    yield index, result
                outputs = ()
                if lockstep is not None:
                    if not in_flight and not exhausted and worker is not None and worker.pending:
                        ready.extend(worker.done(wait=True))  # local work first; the other ranks wait for this one
                        continue
                    if not lockstep.any_rank_busy(bool(in_flight) or not exhausted):
                        break  # every rank is done with the engine; only local decoding is left
                    self.stats.engine_steps += bool(in_flight)
                    outputs = lockstep.step(has_requests=bool(in_flight))
                elif in_flight:
                    self.stats.engine_steps += 1
                    outputs = engine.step()
                elif worker is not None and worker.pending:
                    ready.extend(worker.done(wait=True))
                    continue
                elif exhausted:
                    return
                for output in outputs:
                    self._output(output, in_flight, by_request, ready, worker)
            while worker is not None and worker.pending:
                ready.extend(worker.done(wait=True))
            while ready:
                index, result = ready.popleft()
                self._count(result)
                yield index, result
        finally:
            if in_flight:
                abort(engine, [rid for pair in in_flight.values() for rid in pair.request_ids])
            if worker is not None:
                self.stats.decode_seconds = worker.close()

    def _count(self, result: GeneratedImage | ImagePreview) -> None:
        if isinstance(result, ImagePreview):
            return
        if result.error is None:
            self.stats.finished += 1
            self.stats.image_tokens += result.spec.num_tokens
        else:
            self.stats.failed += 1

    def _submit(self, index: int, prompt: Any, spec: ImageSpec | ItemError, in_flight: dict, by_request: dict,
                ready: deque) -> None:
        if isinstance(spec, ItemError):
            logger.warning("%s", spec)
            ready.append((index, GeneratedImage.failed(prompt, str(spec))))
            return
        result = GeneratedImage.of(spec)
        where = f"item {index}"
        try:
            cond, uncond = pair_prompts(spec, self.tokens)
            self.limits.check_image(where, self.prompt_len(cond), self.prompt_len(uncond), spec.num_tokens,
                                    spec.height, spec.width, bare_len=self.prompt_len(bare_prompt(spec, self.tokens)))
            pair_id = f"{self._name}:{index}"
            added: list[str] = []
            try:
                for role, text, params in zip((COND, UNCOND), (cond, uncond), pair_sampling_params(spec, pair_id)):
                    if self.previews:
                        added.append(self._add_streamed(f"{pair_id}-{role}", text, params, role == COND))
                    else:
                        added += self.llm.enqueue({"prompt": text}, params, use_tqdm=False)
            except BaseException as exc:
                abort(self.llm.llm_engine, added)  # never leave a half waiting for a twin that will not come
                if not isinstance(exc, Exception):  # Ctrl-C between the halves
                    raise
                raise ItemError(f"{where}: rejected by the engine: {exc}") from exc
        except ItemError as exc:
            logger.warning("%s", exc)
            result.error = str(exc)
            ready.append((index, result))
            return
        watcher = RowWatcher(spec.h, spec.w, self.previews, self.token_ids) if self.previews else None
        in_flight[pair_id] = _Pair(index, result, added, watcher=watcher)
        for role, request_id in zip((COND, UNCOND), added):
            by_request[_external_id(request_id)] = (pair_id, role)
        self.stats.submitted += 1
        self.stats.max_in_engine = max(self.stats.max_in_engine, len(in_flight))

    def _add_streamed(self, request_id: str, text: str, params, stream_tokens: bool) -> str:
        """Add one half directly to the engine (`LLM.enqueue` asks for final outputs only): the half that shows
        the previews streams its new tokens every step."""
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.DELTA if stream_tokens else RequestOutputKind.FINAL_ONLY
        return self.llm.llm_engine.add_request(request_id, {"prompt": text}, params)

    def _output(self, output, in_flight: dict, by_request: dict, ready: deque, worker) -> None:
        key = by_request.get(output.request_id)
        if key is None:
            return  # not this stream's request
        pair = in_flight[key[0]]
        if pair.watcher is not None and key[1] == COND:
            spec = pair.result.spec
            for preview_index, rows, grid in pair.watcher.feed(output.outputs[0].token_ids):
                preview = ImagePreview(pair.index, preview_index, rows)
                worker.submit(pair.index, preview, grid, lambda image, s=spec: compose(image, s.height, s.width))
        if output.finished:
            del by_request[output.request_id]
            self._finish(output, key, in_flight, ready, worker)

    def _finish(self, output, key: tuple[str, str], in_flight: dict, ready: deque, worker) -> None:
        pair_id, role = key
        pair = in_flight[pair_id]
        pair.outputs[role] = output
        result = pair.result
        result.prompt_tokens += len(output.prompt_token_ids or ())
        result.cached_prompt_tokens += output.num_cached_tokens or 0
        if len(pair.outputs) < 2:
            return
        del in_flight[pair_id]
        spec = result.spec
        try:
            cond_ids = pair.watcher.tokens if pair.watcher is not None else pair.outputs[COND].outputs[0].token_ids
            result.codes = pair_codes(cond_ids, pair.outputs[UNCOND].outputs[0].token_ids, spec.h, spec.w,
                                      self.token_ids)
        except PairError as exc:
            result.error = f"item {pair.index}: generation failed: {exc}"
            logger.warning("%s", result.error)
        if result.error is None and worker is not None:
            worker.submit(pair.index, result, result.codes)
        else:
            ready.append((pair.index, result))


class _Decodes:
    """The stream's view of a `DecodeBatcher`: results and previews in, decoded ones collected without blocking."""

    def __init__(self, decode, max_batch: int):
        from emu3_vllm.offline.vq_decode import DecodeBatcher

        self._batcher = DecodeBatcher(decode, max_batch)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0  # submitted, not yet collected

    def submit(self, index: int, result: GeneratedImage | ImagePreview, grid, postprocess=None) -> None:
        self.pending += 1
        future = self._batcher.submit(grid, postprocess)
        future.add_done_callback(lambda f: self._done.put((index, result, f)))

    def done(self, wait: bool = False) -> list[tuple[int, GeneratedImage | ImagePreview]]:
        """Decoded (index, result) pairs so far; with `wait`, block until at least one is there."""
        finished = [self._done.get()] if wait and self.pending else []
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.pending -= len(finished)
        out = []
        for index, result, future in finished:
            exc = future.exception()
            if exc is None:
                result.image = future.result()
            elif isinstance(result, ImagePreview):  # a preview is only a view: the image reports its own error
                logger.warning("item %d: preview %d: %s", index, result.preview_index, exc)
                continue
            else:  # that image fails, the stream goes on
                result.error = f"item {index}: {exc}"
            out.append((index, result))
        return out

    def close(self) -> float:
        """Stop decoding; returns the seconds spent decoding."""
        return self._batcher.close()


def _external_id(request_id: str) -> str:
    """The id outputs carry: vLLM appends "-<8 random characters>" to the id a request was added with."""
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id
