"""The offline Emu3 API: one `Emu3` object owns one vLLM engine and answers questions and draws images with it.

Every call checks each item on its own: a bad item comes back with an error naming it and never sinks the others,
and whatever interrupts a call aborts what it put into the engine, so the next call finds the engine as it was.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from emu3_vllm.cfg_pairs import ImageSpec, PromptTokens, pair_prompts
from emu3_vllm.offline.items import (
    GenerationDefaults,
    ImageLike,
    ItemError,
    UnderstandingItem,
    image_specs,
    load_image,
    one_or_many,
)
from emu3_vllm.offline.previews import ImagePreview
from emu3_vllm.offline.results import Answer, GeneratedImage
from emu3_vllm.prompts import DEFAULT_SYSTEM_PROMPT

__all__ = ["Answer", "Emu3", "GeneratedImage", "ImageSpec", "ItemError", "UnderstandingItem"]


class Emu3:
    """BAAI Emu3 on vLLM.

    `model` is a checkpoint directory (or hub id) of `Emu3ForConditionalGeneration`; `engine_kwargs` go to
    `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `max_num_seqs`, `dtype`).
    The engine is set up by `emu3_vllm.engine.start_llm`, as every front end's is.
    """

    def __init__(self, model: str | os.PathLike, *, seed: int = 0, **engine_kwargs: Any):
        from transformers import Emu3Processor

        from emu3_vllm.engine import check_engine_kwargs, check_kv_cache, start_llm
        from emu3_vllm.layout import ImageTokenIds
        from emu3_vllm.offline.items import EngineLimits, check_model
        from emu3_vllm.settings import EngineSeed, SettingsError, check_value

        try:  # vLLM hands it to numpy's global seed, in the engine's worker, which dies of a bad one
            seed = check_value(EngineSeed, seed, "seed")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        engine_kwargs = check_engine_kwargs(engine_kwargs)
        self.model = check_model(model)
        check_kv_cache(self.model, engine_kwargs.get("kv_cache_dtype"))
        self.processor = Emu3Processor.from_pretrained(self.model)
        tokenizer = self.processor.tokenizer
        self.token_ids = ImageTokenIds.from_tokenizer(tokenizer)
        self.prompt_tokens = PromptTokens.from_tokenizer(tokenizer)
        self._stream_open = 0  # the thread id of the open iter_images() stream, 0 when none
        self._vq_decoder = None
        self.llm = None
        self.llm, self.uses_v2_runner = start_llm(self.model, seed=seed, **engine_kwargs)
        self.limits = EngineLimits.of(self.llm.llm_engine.vllm_config)
        self.max_model_len = self.limits.max_model_len
        # An engine still open at interpreter exit is closed the quick way too (vLLM's own finalizer would wait
        # 5 s for it); a weak reference, so the hook does not keep a dropped engine alive.
        this = weakref.ref(self)
        self._close_at_exit = lambda: (engine := this()) is not None and engine.close()
        atexit.register(self._close_at_exit)

    def close(self) -> None:
        """Shut the engine down now and free its memory (instead of at interpreter exit)."""
        llm, self.llm = getattr(self, "llm", None), None
        if hasattr(self, "_close_at_exit"):
            atexit.unregister(self._close_at_exit)
        if llm is not None:
            from emu3_vllm.engine import shutdown_llm

            shutdown_llm(llm)

    def __enter__(self) -> Emu3:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _engine(self):
        """The running engine, or a clear error why a call cannot use it now."""
        if self.llm is None:
            raise RuntimeError("this Emu3 engine is closed; create a new Emu3(...) to run more work")
        owner = self._stream_open
        if owner:
            if owner != threading.get_ident():
                raise RuntimeError("this Emu3 engine is busy with a generate_images()/iter_images() call from "
                                   "another thread: an engine runs one call at a time (give each thread its own "
                                   "Emu3, or send all prompts in one call)")
            raise RuntimeError("an iter_images() stream is still open on this engine: iterate it to the end or "
                               "close() it before the next call")
        return self.llm

    @property
    def bos_token(self) -> str:
        return self.prompt_tokens.bos

    def _apply_model(self, probe):
        if os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise RuntimeError("running a function on the engine's model needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 "
                               "set before the engine starts (vLLM sends the function to its workers by pickle)")
        return self._engine().apply_model(probe)[0]

    def model_class(self) -> str:
        """`module:Class` of the model the engine loaded (emu3_vllm's native model, not a fallback)."""
        from emu3_vllm.vllm_plugin import probes

        return self._apply_model(probes.model_class_path)

    def image_tokens(self, images: Iterable[ImageLike]) -> list[list[int]]:
        """Visual-token ids (with end-of-line columns) the engine's VQ encoder gives each image of one prompt.

        The images are preprocessed together, as transformers' `Emu3Processor` does for one prompt.
        """
        from emu3_vllm.vllm_plugin import probes

        pil = [load_image(img, f"image {i}") for i, img in enumerate(images)]
        inputs = self.processor.image_processor(images=pil, return_tensors="pt")
        return self._apply_model(probes.ImageTokenProbe(inputs["pixel_values"], inputs["image_sizes"]))

    # ----------------------------------------------------------------------------------------------------------
    # Understanding

    def build_understanding_prompt(self, item: UnderstandingItem, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
        from emu3_vllm.offline.understanding import build_prompt

        return build_prompt(item, self.processor, system_prompt)

    def understand(
        self,
        items: Iterable[Any] | str,
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

        An item is a text, `(text, images)` or `{"text": ..., "images": [...]}`; a single text or dict counts as
        one item. `ignore_eos=True` always generates `max_new_tokens` (vLLM's option of that name; for
        benchmarks). Returns one `Answer` per item, in order. Items with bad input (undecodable or zero-size
        image, placeholder/image count mismatch, prompt longer than the model's context) come back empty with
        `error` set and a warning logged; the rest are answered in one vLLM batch.
        """
        from vllm import SamplingParams

        from emu3_vllm.offline.understanding import answer_items

        llm = self._engine()
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=list(stop) if stop else None, seed=seed, ignore_eos=ignore_eos)
        items = list(one_or_many(items, (str, dict, UnderstandingItem)))
        return answer_items(llm, items, params, processor=self.processor, system_prompt=system_prompt,
                            use_tqdm=use_tqdm)

    # ----------------------------------------------------------------------------------------------------------
    # Text to image

    def image_generation_prompts(self, prompt: str, h: int, w: int, negative_prompt: str,
                                 positive_suffix: str) -> tuple[str, str]:
        """(cond, uncond) prompt texts for an h x w token grid (see `cfg_pairs.pair_prompts`)."""
        spec = ImageSpec(prompt=prompt, h=h, w=w, cfg_scale=1.0, seed=0, negative_prompt=negative_prompt,
                         positive_suffix=positive_suffix, top_k=0, temperature=1.0)
        return pair_prompts(spec, self.prompt_tokens)

    def _prompt_len(self, text: str) -> int:
        return len(self.processor.tokenizer.encode(text, add_special_tokens=False))

    def iter_images(
        self,
        prompts: Iterable[Any] | str,
        *,
        seed: int | Sequence[int] | None = None,
        decode: bool = True,
        indices: Iterable[int] | None = None,
        max_in_flight: int | None = None,
        decode_batch: int | None = None,
        stats=None,
        previews: int = 0,
        **settings: Any,
    ) -> Iterator[tuple[int, GeneratedImage | ImagePreview]]:
        """Text to image with classifier-free guidance, streamed: yields `(index, GeneratedImage)` as each image
        finishes (not in order), every index exactly once.

        Arguments as `generate_images`, plus: `prompts` may be any iterable, read lazily (a generator of a
        million prompts is never materialised); `indices` names the prompts (default 0, 1, ...: errors say
        `item {index}` and an int `seed` gives item `index` the seed `seed + index`); `max_in_flight` caps the
        images submitted to the engine at once (default: the engine's `max_num_seqs`, so the pair scheduler always
        has a waiting pair to start); finished images are VQ-decoded on a background thread while the engine keeps
        stepping, up to `decode_batch` at a time (default: the decoder's batch size, 1 on CPU and 8 on a GPU, so
        each image is yielded as soon as its own batch is decoded). `stats`, an `image_stream.StreamStats`, is
        filled in.

        `previews=k` (0 to 3) also yields each image k times while it is drawn, as `(index, ImagePreview)` before
        its `(index, GeneratedImage)`: the rows drawn so far at the final size over a mid-grey fill, at evenly
        spaced row counts (see `offline.previews`). The finished image is the one a stream without previews
        makes.

        Stopping early (break, close(), an exception, Ctrl-C) aborts the images still in the engine. While the
        stream is open the engine takes no other call.
        """
        from emu3_vllm.offline.image_stream import ImageStream
        from emu3_vllm.settings import Previews, SettingsError, check_value

        llm = self._engine()
        defaults = GenerationDefaults.of(settings)
        try:
            previews = check_value(Previews, previews, "previews")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        decoder = self._decoder() if decode else None
        stream = ImageStream(llm, tokens=self.prompt_tokens, token_ids=self.token_ids, limits=self.limits,
                             prompt_len=self._prompt_len,
                             max_in_flight=max_in_flight if max_in_flight is not None else self.limits.max_num_seqs,
                             decoder=decoder, decode_batch=decode_batch or getattr(decoder, "batch_size", 1),
                             previews=previews)
        if stats is not None:
            stream.stats = stats
        items = image_specs(one_or_many(prompts, (str, dict, ImageSpec)), indices, seed, defaults)
        return self._guarded(stream.run(items))

    def _guarded(self, stream: Iterator) -> Iterator:
        """`stream`, with this engine marked busy while it is open."""
        self._engine()  # another stream may have opened since this one was created
        self._stream_open = threading.get_ident()
        try:
            yield from stream
        finally:
            stream.close()
            self._stream_open = 0

    def generate_images(
        self,
        prompts: Iterable[Any] | str,
        *,
        seed: int | Sequence[int] | None = None,
        decode: bool = True,
        use_tqdm: bool = True,
        max_in_flight: int | None = None,
        **settings: Any,
    ) -> list[GeneratedImage]:
        """Text to image with classifier-free guidance; one result per prompt, in order.

        The images stream through one engine (`iter_images`), which batches them; the two halves of each image
        (prompt + `positive_suffix`, and `negative_prompt`) are kept in lockstep by the pair-aware scheduler and
        guided by the CFG logits processor. `settings` are the images' settings (`settings.CALL_LEVEL`: `height`,
        `width`, `cfg_scale`, `negative_prompt`, `positive_suffix`, `top_k`, `temperature`; Emu3's defaults:
        720x720, scale 3, top-k 2048, Emu3's prompts). `temperature=0` is greedy. `seed`: None draws a seed per
        image, an int gives image i the seed `seed + i`, a sequence gives one seed per prompt. Each side of the size
        is rounded to the nearest multiple of 8 pixels, halves up. A prompt may be a dict overriding `height`,
        `width`, `cfg_scale`, `seed`, `negative_prompt` for itself; a single string or dict is one prompt.
        """
        from tqdm import tqdm

        prompts = list(one_or_many(prompts, (str, dict, ImageSpec)))
        results: dict[int, GeneratedImage] = {}
        with tqdm(total=len(prompts), desc="images", unit="img", disable=not use_tqdm) as bar:
            for index, result in self.iter_images(prompts, seed=seed, decode=decode, max_in_flight=max_in_flight,
                                                  **settings):
                results[index] = result
                bar.update(1)
        return [results[i] for i in range(len(prompts))]

    def _decoder(self):
        if self._vq_decoder is None:
            from emu3_vllm.offline.vq_decode import VQDecoder

            self._vq_decoder = VQDecoder(self.model)
        return self._vq_decoder

    def decode_images(self, grids: list[list[list[int]]]) -> list:
        """PIL images from VQ code grids (transformers' Emu3 VQ-VAE, loaded once)."""
        return self._decoder().decode(grids)
