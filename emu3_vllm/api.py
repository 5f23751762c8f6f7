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

from .prompts import (DEFAULT_CFG_SCALE, DEFAULT_SYSTEM_PROMPT, NEGATIVE_PROMPT, POSITIVE_SUFFIX,
                      understanding_prompt)

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


@dataclass
class GeneratedImage:
    """One text-to-image result: `image` (PIL) and `codes` (the (h, w) VQ code grid), or `error`."""

    prompt: Any
    height: int
    width: int
    seed: int | None
    image: Any = None
    codes: list[list[int]] | None = None
    error: str | None = None
    # Prompt tokens of both CFG halves, and how many of them vLLM's prefix cache served (the shared negative prompt).
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


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


def pin_model_runner() -> bool:
    """Whether the engine will run vLLM's Model Runner V2, fixed now so the CFG adapter matches the runner.

    `VLLM_USE_V2_MODEL_RUNNER` decides when set; otherwise vLLM's own default (V2 where Triton works, i.e. on
    GPUs; V1 on CPU builds) is pinned into it for the engine processes.
    """
    import importlib.util

    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is None:
        from vllm.triton_utils import HAS_TRITON

        # vLLM releases before V2 took custom logits processors (e.g. 0.26) lack its interface module.
        try:
            v2_interface = importlib.util.find_spec("vllm.v1.worker.gpu.sample.logits_processor") is not None
        except ModuleNotFoundError:
            v2_interface = False
        value = "1" if HAS_TRITON and v2_interface else "0"
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = value
    return value.strip().lower() in ("1", "true", "yes")


def cfg_logits_processor(v2_runner: bool) -> type:
    """The CFG logits-processor adapter for the runner's interface (both wrap `cfg.guide_pairs`)."""
    if v2_runner:
        from .cfg_processor_v2 import Emu3CfgLogitsProcessorV2

        return Emu3CfgLogitsProcessorV2
    from .cfg_processor import Emu3CfgLogitsProcessor

    return Emu3CfgLogitsProcessor


def pair_scheduler(engine_kwargs: dict) -> str:
    """The pair-aware scheduler matching the engine's scheduling mode: vLLM turns async scheduling on by default
    except on CPU, and a synchronous scheduler class would switch it off."""
    from vllm.platforms import current_platform

    if engine_kwargs.get("async_scheduling") is False or current_platform.is_cpu():
        return "emu3_vllm.scheduler.PairAwareScheduler"
    return "emu3_vllm.scheduler.PairAwareAsyncScheduler"


class Emu3:
    """BAAI Emu3 on vLLM.

    `model` is a checkpoint directory (or hub id) of `Emu3ForConditionalGeneration`; `engine_kwargs` go to
    `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `max_num_seqs`, `dtype`).
    """

    def __init__(self, model: str | os.PathLike, *, seed: int = 0, **engine_kwargs: Any):
        from transformers import Emu3Processor
        from vllm import LLM

        from .layout import ImageTokenIds

        self.model = str(model)
        self.processor = Emu3Processor.from_pretrained(self.model)
        self.token_ids = ImageTokenIds.from_tokenizer(self.processor.tokenizer)
        self.uses_v2_runner = pin_model_runner()
        engine_kwargs.setdefault("logits_processors", [cfg_logits_processor(self.uses_v2_runner)])
        engine_kwargs.setdefault("scheduler_cls", pair_scheduler(engine_kwargs))
        self.llm = LLM(model=self.model, seed=seed, **engine_kwargs)
        vllm_config = self.llm.llm_engine.vllm_config
        self.max_model_len = vllm_config.model_config.max_model_len
        self._kv_blocks = vllm_config.cache_config.num_gpu_blocks
        self._block_size = vllm_config.cache_config.block_size
        self._max_batched_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        scheduler_cls = vllm_config.scheduler_config.scheduler_cls
        self._pair_scheduler = "PairAware" in str(getattr(scheduler_cls, "__name__", scheduler_cls))
        if not self._pair_scheduler:
            logger.warning("scheduler %s is not emu3_vllm's PairAwareScheduler: CFG pairs may fall out of lockstep "
                           "(such images fail with an error)", scheduler_cls)
        self._vq_decoder = None

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

    def _wait(self, expected: int, use_tqdm: bool) -> list:
        """Run everything enqueued as one batch; outputs come in submission order."""
        if not expected:
            return []
        outputs = self.llm.wait_for_completion(use_tqdm=use_tqdm)
        if len(outputs) != expected:
            raise RuntimeError(f"engine returned {len(outputs)} outputs for {expected} requests")
        return outputs

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
        ignore_eos: bool = False,
    ) -> list[Answer]:
        """Answer each item (a text with zero or more images); greedy by default.

        `ignore_eos=True` always generates `max_new_tokens` (vLLM's option of that name; for benchmarks).

        Returns one `Answer` per item, in order. Items with bad input (undecodable or zero-size image,
        placeholder/image count mismatch, prompt longer than the model's context) come back empty with `error`
        set and a warning logged; the rest are answered in one vLLM batch.
        """
        from vllm import SamplingParams

        items = list(items)
        answers: list[Answer | None] = [None] * len(items)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=list(stop) if stop else None, seed=seed, ignore_eos=ignore_eos)
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
            for i, out in zip(enqueued, self._wait(len(enqueued), use_tqdm)):
                completion = out.outputs[0]
                answers[i] = Answer(completion.text, token_ids=completion.token_ids)
        return [a if a is not None else Answer(error=f"item {i}: no output") for i, a in enumerate(answers)]

    # ----------------------------------------------------------------------------------------------------------
    # Text to image

    def _prompt_len(self, text: str) -> int:
        return len(self.processor.tokenizer.encode(text, add_special_tokens=False))

    def image_generation_prompts(self, prompt: str, h: int, w: int, negative_prompt: str,
                                 positive_suffix: str) -> tuple[str, str]:
        """(cond, uncond) prompt texts. Both end with the image header, as in Emu3's official script."""
        from .layout import header_text

        tok = self.processor.tokenizer
        header = header_text(h, w, boi_token=tok.boi_token, image_wrapper_token=tok.image_wrapper_token)
        return (self.bos_token + prompt + positive_suffix + header, self.bos_token + negative_prompt + header)

    def _check_generation_item(self, prompt: Any, height: Any, width: Any, cfg_scale: Any, where: str):
        import math

        from .layout import num_image_tokens, pixels_to_grid

        if not isinstance(prompt, str):
            raise ItemError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ItemError(f"{where}: prompt is empty")
        if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool) or not math.isfinite(cfg_scale) \
                or cfg_scale <= 0:
            raise ItemError(f"{where}: cfg_scale must be a finite number > 0, got {cfg_scale!r}")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ItemError(f"{where}: {name} must be a positive integer, got {value!r}")
        try:
            h, w = pixels_to_grid(height, width)
        except ValueError as exc:
            raise ItemError(f"{where}: {exc}") from exc
        return h, w, num_image_tokens(h, w)

    def _check_fits(self, where: str, cond_len: int, uncond_len: int, n_tokens: int, h: int, w: int) -> None:
        from vllm.utils.math_utils import cdiv

        from .layout import grid_to_pixels

        longest = max(cond_len, uncond_len) + n_tokens
        if longest > self.max_model_len:
            height, width = grid_to_pixels(h, w)
            raise ItemError(f"{where}: a {height}x{width} image needs {n_tokens} tokens after a {max(cond_len, uncond_len)}"
                            f"-token prompt: {longest} positions, beyond the model's max_model_len "
                            f"{self.max_model_len}")
        blocks = cdiv(cond_len + n_tokens, self._block_size) + cdiv(uncond_len + n_tokens, self._block_size)
        if self._kv_blocks is not None and blocks > self._kv_blocks:
            raise ItemError(f"{where}: the image's two CFG halves need {blocks} KV blocks; the cache has "
                            f"{self._kv_blocks} (raise the KV cache size)")
        if self._pair_scheduler and cond_len + uncond_len > self._max_batched_tokens:
            raise ItemError(f"{where}: the two prompts ({cond_len + uncond_len} tokens) exceed "
                            f"max_num_batched_tokens {self._max_batched_tokens}")

    def generate_images(
        self,
        prompts: Iterable[Any],
        height: int = 720,
        width: int = 720,
        cfg_scale: float = DEFAULT_CFG_SCALE,
        negative_prompt: str = NEGATIVE_PROMPT,
        positive_suffix: str = POSITIVE_SUFFIX,
        top_k: int = 2048,
        temperature: float = 1.0,
        seed: int | Sequence[int] | None = None,
        decode: bool = True,
        use_tqdm: bool = True,
    ) -> list[GeneratedImage]:
        """Text to image with classifier-free guidance; one result per prompt, in order.

        All images go to the engine at once so vLLM batches them; the two halves of each image (prompt +
        `positive_suffix`, and `negative_prompt`) are kept in lockstep by the pair-aware scheduler and guided by
        the CFG logits processor. `temperature=0` is greedy. `seed`: None draws a seed per image, an int gives
        image i the seed `seed + i`, a sequence gives one seed per prompt. The size is rounded to multiples of 8.
        A prompt may be a dict overriding `height`, `width`, `cfg_scale`, `seed`, `negative_prompt` for itself.
        """
        import secrets

        from vllm import SamplingParams

        from .cfg_processor import COND, EXTRA_ARGS_KEY, UNCOND
        from .layout import LayoutError, grid_to_pixels, parse_image_tokens

        prompts = list(prompts)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise ValueError(f"got {len(seed)} seeds for {len(prompts)} prompts")
            seeds = [int(s) for s in seed]
        elif seed is None:
            seeds = [secrets.randbits(31) for _ in prompts]
        else:
            seeds = [int(seed) + i for i in range(len(prompts))]

        results: list[GeneratedImage] = []
        enqueued: list[tuple[int, str]] = []  # (item, role) in submission order
        grids: dict[int, tuple[int, int]] = {}
        call_id = secrets.token_hex(4)
        for i, prompt in enumerate(prompts):
            where = f"item {i}"
            item = dict(prompt=prompt, height=height, width=width, cfg_scale=cfg_scale, seed=seeds[i],
                        negative_prompt=negative_prompt)
            result = GeneratedImage(prompt=prompt, height=height, width=width, seed=seeds[i])
            results.append(result)
            try:
                if isinstance(prompt, dict):  # per-item overrides
                    unknown = set(prompt) - set(item)
                    if unknown:
                        raise ItemError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(item)}")
                    item.update(prompt)
                    result.prompt, result.seed = item["prompt"], item["seed"]
                    result.height, result.width = item["height"], item["width"]
                h, w, n_tokens = self._check_generation_item(item["prompt"], item["height"], item["width"],
                                                             item["cfg_scale"], where)
                result.height, result.width = grid_to_pixels(h, w)
                cond, uncond = self.image_generation_prompts(item["prompt"], h, w, item["negative_prompt"],
                                                             positive_suffix)
                self._check_fits(where, self._prompt_len(cond), self._prompt_len(uncond), n_tokens, h, w)
                tag = {"pair": f"{call_id}:{i}", "scale": float(item["cfg_scale"]), "h": h, "w": w,
                       "seed": int(item["seed"]),
                       "temperature": float(temperature), "top_k": int(top_k)}
                added = []
                try:
                    for role, text in ((COND, cond), (UNCOND, uncond)):
                        params = SamplingParams(max_tokens=n_tokens, temperature=0.0,
                                                extra_args={EXTRA_ARGS_KEY: {**tag, "role": role}})
                        added += self.llm.enqueue({"prompt": text}, params, use_tqdm=False)
                except Exception as exc:
                    if added:  # never leave a half waiting for a twin that will not come
                        self.llm.llm_engine.abort_request(added, internal=True)
                    raise ItemError(f"{where}: rejected by the engine: {exc}") from exc
                enqueued += [(i, COND), (i, UNCOND)]
                grids[i] = (h, w)
            except ItemError as exc:
                logger.warning("%s", exc)
                result.error = str(exc)

        token_ids: dict[tuple[int, str], list[int]] = {}
        for (i, role), out in zip(enqueued, self._wait(len(enqueued), use_tqdm)):
            token_ids[(i, role)] = list(out.outputs[0].token_ids)
            results[i].prompt_tokens += len(out.prompt_token_ids or ())
            results[i].cached_prompt_tokens += out.num_cached_tokens or 0

        to_decode = []
        for i, (h, w) in grids.items():
            cond_ids, uncond_ids = token_ids[(i, COND)], token_ids[(i, UNCOND)]
            try:
                if cond_ids != uncond_ids:
                    raise LayoutError("the CFG halves generated different tokens")
                results[i].codes = parse_image_tokens(cond_ids, h, w, self.token_ids)
                to_decode.append(i)
            except LayoutError as exc:
                ended_early = self.token_ids.eos in cond_ids[:-1] or (
                    cond_ids and cond_ids[-1] == self.token_ids.eos and len(cond_ids) < h * (w + 1) + 3)
                reason = ("its CFG halves fell out of lockstep and the image was stopped "
                          f"after {len(cond_ids)} tokens") if ended_early else str(exc)
                results[i].error = f"item {i}: generation failed: {reason}"
                logger.warning("%s", results[i].error)
        if decode and to_decode:
            images = self.decode_images([results[i].codes for i in to_decode])
            for i, image in zip(to_decode, images):
                results[i].image = image
        return results

    def decode_images(self, grids: list[list[list[int]]]) -> list:
        """PIL images from VQ code grids (transformers' Emu3 VQ-VAE, loaded once)."""
        if self._vq_decoder is None:
            from .vq import VQDecoder

            self._vq_decoder = VQDecoder(self.model)
        return self._vq_decoder.decode(grids)
