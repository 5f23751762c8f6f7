"""VQ decode of generated code grids to PIL images with transformers' own `Emu3VQVAE` (no copied model code).

Only the VQ-VAE's weights are read from the checkpoint, so decoding does not load the 8B text model.
"""

from __future__ import annotations

import json
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


class DecodeWorker:
    """VQ-decodes finished images on a background thread, a batch of whatever has arrived (up to `max_batch`) at a
    time, so the engine keeps stepping while images decode. `decode` maps code grids to images; a batch that fails
    to decode fails its images (with the reason), not the stream."""

    def __init__(self, decode, max_batch: int = 32):
        import queue
        import threading

        self._decode = decode
        self._max_batch = max(1, max_batch)
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self.pending = 0  # submitted, not yet collected
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="emu3-vq-decode", daemon=True)
        self._thread.start()

    def submit(self, index: int, result) -> None:
        self.pending += 1
        self._todo.put((index, result))

    def done(self, wait: bool = False) -> list:
        """Decoded (index, result) pairs so far; with `wait`, block until at least one is there."""
        import queue

        out = []
        if wait and self.pending:
            out.append(self._done.get())
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.pending -= len(out)
        return out

    def close(self) -> float:
        """Stop after the batch in hand; returns the seconds spent decoding."""
        self._todo.put(None)
        self._thread.join()
        return self.busy_seconds

    def _run(self) -> None:
        import contextlib
        import queue
        import time

        # Decoding on its own CUDA stream lets it overlap other GPU work of this process.
        stream = torch.cuda.stream(torch.cuda.Stream()) if torch.cuda.is_available() else contextlib.nullcontext()
        with stream:
            while True:
                first = self._todo.get()
                if first is None:
                    return
                batch, stop = [first], False
                while len(batch) < self._max_batch:
                    try:
                        item = self._todo.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                start = time.perf_counter()
                try:
                    for (_, result), image in zip(batch, self._decode([r.codes for _, r in batch])):
                        result.image = image
                except Exception as exc:  # e.g. out of memory: those images fail, the stream goes on
                    for index, result in batch:
                        result.error = f"item {index}: VQ decode failed: {type(exc).__name__}: {exc}"
                self.busy_seconds += time.perf_counter() - start
                for item in batch:
                    self._done.put(item)
                if stop:
                    return
