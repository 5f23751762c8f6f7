"""VQ decode for an asyncio server: code grids in, base64 PNGs out, batched, never on the event loop.

Requests await `encode(grid)`; one worker thread takes every grid waiting at that moment (up to `max_batch`),
decodes them as one batch with `VQDecoder.decode` and PNG-encodes them, while the event loop keeps serving. Grids
that finish while a batch is decoding form the next batch, so the batch size follows the load by itself. A batch
that fails to decode fails its own requests only.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class DecodeError(RuntimeError):
    """VQ decode or PNG encoding of an image failed."""


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class AsyncDecoder:
    def __init__(self, decode: Callable[[list], list], max_batch: int = 32):
        self._decode = decode
        self._max_batch = max(1, max_batch)
        self._waiting: list[tuple[list[list[int]], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        # One thread: decode batches run one after another, each using the threads torch gives it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emu3-vq-decode")
        self.batches: list[int] = []  # size of each decoded batch, for tests and benchmarks

    async def encode(self, grid: list[list[int]]) -> str:
        """The image of a code grid, as a base64 PNG."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((grid, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = [item for item in self._waiting[:self._max_batch] if not item[1].done()]  # done = cancelled
            del self._waiting[:self._max_batch]
            if not batch:
                continue
            try:
                encoded = await loop.run_in_executor(self._executor, self._work, [grid for grid, _ in batch])
            except Exception as exc:  # noqa: BLE001 - reported to each waiting request
                error = DecodeError(f"VQ decode failed: {type(exc).__name__}: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches.append(len(batch))
            for (_, future), b64 in zip(batch, encoded):
                if not future.done():
                    future.set_result(b64)

    def _work(self, grids: list) -> list[str]:
        return [png_b64(image) for image in self._decode(grids)]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
