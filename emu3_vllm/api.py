"""Offline Emu3 engine: batched understanding on vLLM.

One `Emu3` object owns one `vllm.LLM`. Every call validates each item on its own, enqueues all valid items
into the engine so vLLM batches them together, and returns one result per item in input order: a bad item
gets an error naming it, never sinks the others.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import DEFAULT_SYSTEM_PROMPT, understanding_prompt

logger = logging.getLogger("emu3_vllm")

ImageLike = Any  # PIL.Image.Image, a path, or encoded bytes


class Answer(str):
    """An understanding answer: the text itself, plus `error` (None when it succeeded) and `token_ids`."""

    error: str | None
    token_ids: tuple[int, ...]

    def __new__(cls, text: str = "", *, error: str | None = None, token_ids: Sequence[int] = ()):
        obj = super().__new__(cls, text)
        obj.error = error
        obj.token_ids = tuple(token_ids)
        return obj

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class UnderstandingItem:
    text: str
    images: tuple[Any, ...] = ()


class ItemError(ValueError):
    """A problem with one input item; its message names the item."""


def load_image(image: ImageLike, where: str):
    """An RGB PIL image from a PIL image, a path or bytes, fully decoded so corrupt data fails here."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, (str, os.PathLike)):
            img = Image.open(Path(image))
        elif isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        else:
            raise ItemError(f"{where}: expected a PIL image, a path or bytes, got {type(image).__name__}")
        img.load()
    except ItemError:
        raise
    except Exception as exc:  # PIL raises many types for undecodable data
        raise ItemError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if img.width == 0 or img.height == 0:
        raise ItemError(f"{where}: image has zero size ({img.width}x{img.height})")
    return img.convert("RGB") if img.mode != "RGB" else img


def as_understanding_item(item: Any, where: str) -> UnderstandingItem:
    """Accept `text`, `(text, images)` or `{"text": ..., "images": [...]}`; a single image need not be a list."""
    if isinstance(item, UnderstandingItem):
        text, images = item.text, item.images
    elif isinstance(item, str):
        text, images = item, ()
    elif isinstance(item, dict):
        unknown = set(item) - {"text", "images", "image", "prompt"}
        if unknown:
            raise ItemError(f"{where}: unknown keys {sorted(unknown)}; use 'text' and 'images'")
        text = item.get("text", item.get("prompt"))
        images = item.get("images", item.get("image", ()))
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        text, images = item
    else:
        raise ItemError(f"{where}: expected a text, (text, images) or a dict with 'text' and 'images', "
                        f"got {type(item).__name__}")
    if not isinstance(text, str):
        raise ItemError(f"{where}: text must be a string, got {type(text).__name__}")
    if images is None:
        images = ()
    elif not isinstance(images, (list, tuple)):
        images = (images,)
    return UnderstandingItem(text=text, images=tuple(images))


class Emu3:
    """BAAI Emu3 on vLLM.

    `model` is a checkpoint directory (or hub id) of `Emu3ForConditionalGeneration`; `engine_kwargs` go to
    `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `max_num_seqs`, `dtype`).
    """

    def __init__(self, model: str | os.PathLike, *, seed: int = 0, **engine_kwargs: Any):
        from transformers import Emu3Processor
        from vllm import LLM

        self.model = str(model)
        self.processor = Emu3Processor.from_pretrained(self.model)
        self.llm = LLM(model=self.model, seed=seed, **engine_kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        """Shut the engine down now and free its memory (instead of at interpreter exit)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> "Emu3":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def bos_token(self) -> str:
        return self.processor.tokenizer.bos_token

    def _apply_model(self, probe):
        if os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise RuntimeError("running a function on the engine's model needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 "
                               "set before the engine starts (vLLM sends the function to its workers by pickle)")
        return self.llm.apply_model(probe)[0]

    def model_class(self) -> str:
        """`module:Class` of the model the engine loaded (emu3_vllm's native model, not a fallback)."""
        from . import engine_probes

        return self._apply_model(engine_probes.model_class_path)

    def image_tokens(self, images: Iterable[ImageLike]) -> list[list[int]]:
        """Visual-token ids (with end-of-line columns) the engine's VQ encoder gives each image of one prompt.

        The images are preprocessed together, as transformers' `Emu3Processor` does for one prompt.
        """
        from . import engine_probes

        pil = [load_image(img, f"image {i}") for i, img in enumerate(images)]
        inputs = self.processor.image_processor(images=pil, return_tensors="pt")
        return self._apply_model(engine_probes.ImageTokenProbe(inputs["pixel_values"], inputs["image_sizes"]))

    def build_understanding_prompt(self, item: UnderstandingItem, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
        body = understanding_prompt(item.text, len(item.images), image_token=self.processor.image_token,
                                    system_prompt=system_prompt)
        return self.bos_token + body

    def understand(
        self,
        items: Iterable[Any],
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        use_tqdm: bool = True,
    ) -> list[Answer]:
        """Answer each item (a text with zero or more images); greedy by default.

        Returns one `Answer` per item, in order. Items with bad input (undecodable or zero-size image,
        placeholder/image count mismatch, prompt longer than the model's context) come back empty with `error`
        set and a warning logged; the rest are answered in one vLLM batch.
        """
        from vllm import SamplingParams

        items = list(items)
        answers: list[Answer | None] = [None] * len(items)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=list(stop) if stop else None, seed=seed)
        # wait_for_completion returns outputs in submission order; enqueue adds one request or raises.
        enqueued: list[int] = []
        for i, raw in enumerate(items):
            where = f"item {i}"
            try:
                item = as_understanding_item(raw, where)
                images = [load_image(img, f"{where}, image {j}") for j, img in enumerate(item.images)]
                try:
                    prompt = self.build_understanding_prompt(item, system_prompt)
                except ValueError as exc:
                    raise ItemError(f"{where}: {exc}") from exc
                request = {"prompt": prompt}
                if images:
                    request["multi_modal_data"] = {"image": images}
                try:
                    self.llm.enqueue(request, params, use_tqdm=False)
                except Exception as exc:  # vLLM's own validation: prompt length, image processing
                    raise ItemError(f"{where}: rejected by the engine: {exc}") from exc
                enqueued.append(i)
            except ItemError as exc:
                logger.warning("%s", exc)
                answers[i] = Answer(error=str(exc))

        if enqueued:
            outputs = self.llm.wait_for_completion(use_tqdm=use_tqdm)
            if len(outputs) != len(enqueued):
                raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(enqueued)} requests")
            for i, out in zip(enqueued, outputs):
                completion = out.outputs[0]
                answers[i] = Answer(completion.text, token_ids=completion.token_ids)
        return [a if a is not None else Answer(error=f"item {i}: no output") for i, a in enumerate(answers)]
