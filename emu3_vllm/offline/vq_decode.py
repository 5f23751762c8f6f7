"""VQ decode of generated code grids to PIL images with transformers' own `Emu3VQVAE` (no copied model code).

Only the VQ-VAE's weights are read from the checkpoint, so decoding does not load the 8B text model.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

_VQ_PREFIXES = ("vqmodel.", "model.vqmodel.")

# An image's pixels must depend on its codes alone, so that the same seed gives the same PNG offline, through the
# server and on a resumed run. Convolution kernels pick their algorithm by batch size and split their sums by thread
# count, so an image decoded in a batch of another size, or by another number of threads, can differ in the last
# bit of some pixels: decode runs in batches of one fixed size per device (the last one padded) and, on CPU, with a
# fixed number of threads. On CPU one thread beside the engine (vLLM's CPU engine keeps its own cores busy) decodes
# fastest, and batching bought nothing there (measured on the small checkpoint's decoder); a GPU decodes a batch of
# 8 at little more than the cost of one.
DECODE_BATCH = {"cpu": 1, "cuda": 8}
CPU_DECODE_THREADS = 1


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


class VQDecoder:
    def __init__(self, checkpoint: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        from safetensors import safe_open
        from transformers import Emu3Config, Emu3ImageProcessor
        from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

        path = Path(checkpoint)
        config = Emu3Config.from_pretrained(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32
        self.vq = Emu3VQVAE(config.vq_config)
        state = {}
        for file in _checkpoint_files(path):
            with safe_open(str(file), "pt") as fh:
                for key in fh.keys():
                    for prefix in _VQ_PREFIXES:
                        if key.startswith(prefix):
                            state[key[len(prefix):]] = fh.get_tensor(key)
        missing, unexpected = self.vq.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"VQ weights missing from {path}: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.vq.to(device=self.device, dtype=self.dtype).eval()
        self.image_processor = Emu3ImageProcessor.from_pretrained(path)
        self.batch_size = DECODE_BATCH.get(self.device.type, 1)

    @torch.no_grad()
    def decode(self, grids: list[list[list[int]]]) -> list:
        """PIL images for (h, w) code grids, decoded in batches of `batch_size` grids of one shape."""
        images: list = [None] * len(grids)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(grids):
            by_shape.setdefault((len(grid), len(grid[0])), []).append(i)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(CPU_DECODE_THREADS)  # this thread's OpenMP setting only
        try:
            for idxs in by_shape.values():
                for start in range(0, len(idxs), self.batch_size):
                    chunk = idxs[start:start + self.batch_size]
                    rows = [grids[i] for i in chunk]
                    rows += [rows[-1]] * (self.batch_size - len(rows))
                    codes = torch.tensor(rows, dtype=torch.long, device=self.device)
                    pixels = self.vq.decode(codes).float().cpu()[:len(chunk)]
                    pil = self.image_processor.postprocess(list(pixels),
                                                           return_tensors="PIL.Image.Image")["pixel_values"]
                    for i, image in zip(chunk, pil):
                        images[i] = image
        finally:
            torch.set_num_threads(threads)
        return images


class DecodeError(RuntimeError):
    """VQ decode (or the postprocess after it) of an image failed."""


class DecodeBatcher:
    """Decodes code grids on one background thread, a batch of whatever waits (up to `max_batch`) at a time.

    `submit(grid)` returns a `concurrent.futures.Future` of the grid's image (`postprocess(image)` when given, the
    batcher's or the grid's own: it runs on the worker thread, so a server's event loop never encodes a PNG). Grids
    that arrive while a batch decodes form the next batch, so batch size follows the load by itself. A batch that
    fails fails its own futures with a `DecodeError` carrying the reason; a future cancelled before its batch starts
    is skipped.
    """

    def __init__(self, decode: Callable[[list], list], max_batch: int = 32, postprocess: Callable | None = None):
        self._decode = decode
        self._postprocess = postprocess
        self._max_batch = max(1, max_batch)
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.busy_seconds = 0.0  # decoding and postprocessing, failed batches included
        self.batches: list[int] = []  # size of each batch decoded, for tests and benchmarks
        self._thread = threading.Thread(target=self._run, name="emu3-vq-decode", daemon=True)
        self._thread.start()

    def submit(self, grid: list[list[int]], postprocess: Callable | None = None) -> Future:
        if self._closed:
            raise RuntimeError("the decode batcher is closed")
        future: Future = Future()
        self._todo.put((grid, future, postprocess or self._postprocess))
        return future

    @property
    def waiting(self) -> int:
        """Grids submitted that no batch has taken yet."""
        return self._todo.qsize()

    def close(self) -> float:
        """Cancel what waits, stop after the batch in hand; returns the seconds spent decoding."""
        self._closed = True
        while True:
            try:
                _, future, _ = self._todo.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        self._todo.put(None)
        self._thread.join()
        return self.busy_seconds

    def _run(self) -> None:
        # Decoding on its own CUDA stream lets it overlap other GPU work of this process.
        stream = torch.cuda.stream(torch.cuda.Stream()) if torch.cuda.is_available() else contextlib.nullcontext()
        with stream:
            stop = False
            while not stop:
                first = self._todo.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        item = self._todo.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._decode_batch([item for item in batch if item[1].set_running_or_notify_cancel()])

    def _decode_batch(self, batch: list[tuple[list[list[int]], Future, Callable | None]]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        try:
            images = self._decode([grid for grid, _, _ in batch])
            images = [image if post is None else post(image) for image, (_, _, post) in zip(images, batch)]
        except Exception as exc:  # e.g. out of memory: these images fail, later batches go on
            error = DecodeError(f"VQ decode failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            for _, future, _ in batch:
                future.set_exception(error)
            return
        finally:
            self.busy_seconds += time.perf_counter() - start
        self.batches.append(len(batch))
        for (_, future, _), image in zip(batch, images):
            future.set_result(image)
