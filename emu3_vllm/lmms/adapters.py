"""lmms-eval models `emu3_vllm` and `emu3_vllm_visual_cot`: thin adapters over `emu3_vllm.Emu3`.

They translate lmms-eval requests into batched `Emu3.understand` / `Emu3.generate_images` calls and the results
back, accepting the model_args of the HF-based Emu3 integration (see the README's table). Under torchrun they run
one rank each, `tensor_parallel_size` x `data_parallel_size` ranks in all (see `torchrun`). A generated image's
seed is `seed` + its doc id, so it does not depend on how the requests were split over ranks.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

from emu3_vllm import settings
from emu3_vllm.lmms.torchrun import Launch
from emu3_vllm.prompts import NEGATIVE_PROMPT

# The HF integration's default template for the image to draw when a task gives no [GEN_PROMPT].
GENERATION_PROMPT_TEMPLATE = (
    "Generate a detailed visual diagram or illustration to help answer this question: {question}"
)
_GEN_PROMPT = re.compile(r"\[GEN_PROMPT\](.*?)\[/GEN_PROMPT\]", re.S)
_QUESTION = re.compile(r"\[QUESTION\](.*?)\[/QUESTION\]", re.S)


def _as_bool(value: Any, name: str) -> bool:
    """A boolean model_arg; lmms-eval hands over `true`/`false` as bools and anything else as it was typed."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"emu3_vllm model_arg {name}: expected true or false, got {value!r}")


def _as_number(value: Any, name: str, kind: type = float, bounds: Any = None):
    """An int or float model_arg, or a ValueError naming it (lmms-eval passes numbers typed, the rest as text).
    `bounds`, one of `emu3_vllm.settings`' field types, holds it to the range the offline API and server allow."""
    from emu3_vllm.settings import SettingsError, check_value

    try:
        if isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value)  # exact, however large: a float would round a 20-digit seed
        else:
            number = float(value)
            if kind is int:
                if not number.is_integer():
                    raise ValueError
                number = int(number)
    except (TypeError, ValueError, OverflowError):
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"emu3_vllm model_arg {name}: expected {expected}, got {value!r:.60}") from None
    if bounds is None:
        return number
    try:
        return check_value(bounds, number, name)
    except SettingsError as exc:
        raise ValueError(f"emu3_vllm model_arg {exc}") from None


def _engine_kwargs(tensor_parallel_size, device_map, gpu_memory_utilization, max_num_seqs, dtype, max_model_len,
                   enforce_eager, extra: dict) -> dict:
    """vllm.LLM kwargs from model_args; unknown model_args are logged and ignored."""
    import dataclasses

    from vllm import EngineArgs

    if device_map not in (None, "auto", "cuda", "cuda:0", "cpu") and tensor_parallel_size is None:
        eval_logger.warning(f"device_map={device_map!r} has no vLLM meaning; use tensor_parallel_size")
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": _as_number(tensor_parallel_size or 1, "tensor_parallel_size", int)
    }
    for name, value in (("gpu_memory_utilization", gpu_memory_utilization), ("max_num_seqs", max_num_seqs),
                        ("dtype", dtype), ("max_model_len", max_model_len), ("enforce_eager", enforce_eager)):
        if value is not None:
            kwargs[name] = value
    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for name, value in extra.items():
        if name in engine_fields:
            kwargs[name] = json.loads(value) if isinstance(value, str) and value.startswith("{") else value
        else:
            eval_logger.warning(f"emu3_vllm: ignoring unknown model_arg {name}={value!r}")
    return kwargs


def _visuals(adapter: lmms, doc_to_visual, doc_id, task, split) -> list:
    visuals = doc_to_visual(adapter.task_dict[task][split][doc_id])
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    flat = []
    for v in visuals:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    return [v for v in flat if v is not None]


def _doc_seed(doc) -> int:
    """A doc's own number for seeding its image: its doc id (a stable hash of it, if it is not an integer)."""
    import zlib

    try:
        return int(doc.doc_id)
    except (TypeError, ValueError):
        return zlib.crc32(str(doc.doc_id).encode("utf-8"))


@dataclass
class _Doc:
    """One request, its images loaded (or the reason they could not be)."""

    index: int
    context: str
    gen_kwargs: dict
    task: str
    doc_id: Any
    images: list = field(default_factory=list)
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.task} doc {self.doc_id}"


def _collect(adapter: lmms, requests: list[Instance]) -> list[_Doc]:
    docs = []
    for i, request in enumerate(requests):
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
        doc = _Doc(i, context, dict(gen_kwargs or {}), task, doc_id)
        try:
            doc.images = _visuals(adapter, doc_to_visual, doc_id, task, split)
        except Exception as exc:  # a corrupt or missing image in the dataset
            doc.error = f"{doc.name}: cannot load its images ({type(exc).__name__}: {exc})"
        docs.append(doc)
    return docs


def _sampling(gen_kwargs: dict, default_max_new_tokens: int, default_temperature: float, default_do_sample: bool):
    gen_kwargs = dict(gen_kwargs)
    gen_kwargs.pop("visual_cot", None)  # routing flag, not a sampling parameter
    max_new_tokens = _as_number(gen_kwargs.get("max_new_tokens", default_max_new_tokens), "max_new_tokens", int)
    do_sample = _as_bool(gen_kwargs.get("do_sample", default_do_sample), "do_sample")
    temperature = _as_number(gen_kwargs.get("temperature", default_temperature), "temperature") if do_sample else 0.0
    top_p = _as_number(gen_kwargs.get("top_p") or 1.0, "top_p")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    return max_new_tokens, temperature, top_p, tuple(until)


class _Emu3Base(lmms):
    is_simple = True

    def __init__(
        self,
        fail_gracefully: bool = True,
        device_map: str | None = None,
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        batch_size: int | str = 1,
        use_flash_attention_2: Any = None,  # accepted from the HF integration; vLLM picks its own attention
        **kwargs,
    ) -> None:
        super().__init__()
        # vLLM batches by itself; kept for lmms-eval's bookkeeping
        self.batch_size_per_gpu = _as_number(batch_size, "batch_size", int) if batch_size != "auto" else 1
        self.fail_gracefully = _as_bool(fail_gracefully, "fail_gracefully")
        self.seed = _as_number(seed, "seed", int, settings.EngineSeed)
        for key in ("device", "max_batch_size"):
            kwargs.pop(key, None)  # lmms-eval's generic arguments; vLLM places the model itself
        self.engine_kwargs = _engine_kwargs(tensor_parallel_size, device_map, gpu_memory_utilization, max_num_seqs,
                                            dtype, max_model_len, enforce_eager, kwargs)
        from emu3_vllm.engine import check_engine_kwargs

        try:  # before lmms-eval loads its tasks, not at the first request
            check_engine_kwargs(self.engine_kwargs)
        except ValueError as exc:
            raise ValueError(f"emu3_vllm model_arg {exc}") from None
        self.launch = Launch.from_env(
            self.engine_kwargs["tensor_parallel_size"],
            None if data_parallel_size is None else _as_number(data_parallel_size, "data_parallel_size", int))
        self.engine_kwargs.update(self.launch.engine_kwargs())
        if self.launch.distributed:
            self._rank, self._world_size = self.launch.rank, self.launch.world_size
            self.device = self.launch.device()

    def _engine(self, checkpoint: str):
        from emu3_vllm.offline.emu3 import Emu3

        return Emu3(checkpoint, seed=self.seed, **self.engine_kwargs)

    def _docs(self, requests: list[Instance]) -> tuple[list[_Doc], list[_Doc]]:
        """All requests as docs, and those whose images loaded (the others are failed per fail_gracefully)."""
        if self.launch.distributed:
            eval_logger.info(f"emu3_vllm: rank {self.launch.rank} of {self.launch.world_size} takes "
                             f"{len(requests)} requests")
        docs = _collect(self, requests)
        for doc in docs:
            if doc.error:
                self._fail(doc, doc.error)
        return docs, [d for d in docs if not d.error]

    def _fail(self, doc: _Doc, message: str) -> None:
        if not self.fail_gracefully:
            raise RuntimeError(message)
        eval_logger.error(message)

    def _understand(self, engine, docs: list[_Doc], questions: list[str], images: list[list], owned: Container[int],
                    max_new_tokens: int, temperature: float, do_sample: bool) -> dict[int, str]:
        """Answers by position in `docs`, in as few engine calls as there are distinct sampling settings (the same
        calls on every data-parallel rank). Failures are reported for the positions this rank `owned`."""
        groups: dict[tuple, list[int]] = {}
        for pos, doc in enumerate(docs):
            groups.setdefault(_sampling(doc.gen_kwargs, max_new_tokens, temperature, do_sample), []).append(pos)
        answers = {}
        for key in self.launch.agree(list(groups)):
            max_tokens, temp, top_p, until = key
            positions = groups.get(key, [])
            results = engine.understand([(questions[p], images[p]) for p in positions], max_new_tokens=max_tokens,
                                        temperature=temp, top_p=top_p, stop=list(until) or None)
            for pos, answer in zip(positions, results):
                if answer.error and pos in owned:
                    self._fail(docs[pos], f"{docs[pos].name}: {answer.error}")
                answers[pos] = str(answer)
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("emu3_vllm does not compute loglikelihoods; use generate_until tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("emu3_vllm does not support multi-round generation")


class Emu3VLLM(_Emu3Base):
    """`--model emu3_vllm`: `mode=understanding` (image QA) or `mode=generation` (text to image, CFG)."""

    def __init__(
        self,
        pretrained: str = "BAAI/Emu3-Chat-hf",
        mode: str = "understanding",
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 0.0,
        image_height: int = settings.DEFAULT_SIDE,
        image_width: int = settings.DEFAULT_SIDE,
        cfg_scale: float = 4.0,
        negative_prompt: str | None = None,
        output_image_dir: str | None = None,
        top_k: int = settings.DEFAULT_TOP_K,
        **kwargs,
    ) -> None:
        if mode not in ("understanding", "generation"):
            raise ValueError(f"mode must be 'understanding' or 'generation', got {mode!r}")
        super().__init__(**kwargs)
        self.mode = mode
        self.max_new_tokens = _as_number(max_new_tokens, "max_new_tokens", int)
        self.do_sample = _as_bool(do_sample, "do_sample")
        self.temperature = _as_number(temperature, "temperature", float, settings.Temperature)
        self.image_height = _as_number(image_height, "image_height", int, settings.Side)
        self.image_width = _as_number(image_width, "image_width", int, settings.Side)
        self.cfg_scale = _as_number(cfg_scale, "cfg_scale", float, settings.CfgScale)
        self.negative_prompt = negative_prompt if negative_prompt is not None else NEGATIVE_PROMPT
        self.output_image_dir = Path(output_image_dir or "./logs/emu3_vllm_images")
        self.top_k = _as_number(top_k, "top_k", int, settings.TopK)
        self.pretrained = pretrained
        # Under torchrun every rank starts its engine now, together (vLLM's external launcher). Otherwise the
        # engine starts at the first request, after the requests' images are loaded: a task with broken inputs and
        # fail_gracefully=false stops in seconds instead of after an engine start.
        self._started = self._engine(pretrained) if self.launch.distributed else None

    @property
    def engine(self):
        if self._started is None:
            self._started = self._engine(self.pretrained)
        return self._started

    def generate_until(self, requests: list[Instance]) -> list[str]:
        docs, ok = self._docs(requests)
        shared, owned = self.launch.share(ok)
        if self.mode == "understanding":
            answers = self._understand(self.engine, shared, [d.context for d in shared], [d.images for d in shared],
                                       owned, self.max_new_tokens, self.temperature, self.do_sample)
            mine = {doc.index: answers.get(pos, "") for pos, doc in zip(owned, ok)}
            return [mine.get(d.index, "") for d in docs]
        return self._generate(docs, ok, shared, owned)

    generate_visual_cot = generate_until

    def _generate(self, docs: list[_Doc], ok: list[_Doc], shared: list[_Doc], owned: range) -> list[str]:
        self.output_image_dir.mkdir(parents=True, exist_ok=True)
        results = self.engine.generate_images(
            [d.context for d in shared], height=self.image_height, width=self.image_width, cfg_scale=self.cfg_scale,
            negative_prompt=self.negative_prompt, top_k=self.top_k, seed=[self.seed + _doc_seed(d) for d in shared])
        outputs = {d.index: json.dumps({"text": "", "images": []}) for d in docs}
        for doc, result in zip(ok, (results[pos] for pos in owned)):
            if result.error:
                self._fail(doc, f"{doc.name}: {result.error}")
                continue
            path = self.output_image_dir / f"{doc.task}_{doc.doc_id}_0.png"
            result.image.save(path)
            outputs[doc.index] = json.dumps({"text": "", "images": [str(path)]}, ensure_ascii=False)
        return [outputs[d.index] for d in docs]


class Emu3VLLMVisualCoT(_Emu3Base):
    """`--model emu3_vllm_visual_cot`: stage 1 draws an auxiliary image per question with the Gen checkpoint,
    stage 2 answers with the Chat checkpoint given the original image(s) plus the auxiliary one.

    All stage-1 work runs as one batch on the Gen engine, which is then released, so each stage has the whole GPU.
    """

    def __init__(
        self,
        pretrained: str = "BAAI/Emu3-Chat-hf",
        gen_pretrained: str | None = None,
        stage1_image_height: int = settings.DEFAULT_SIDE,
        stage1_image_width: int = settings.DEFAULT_SIDE,
        stage1_cfg_scale: float = 4.0,
        stage1_max_new_tokens: int | None = None,
        stage1_negative_prompt: str | None = None,
        stage2_max_new_tokens: int = 16384,
        stage2_temperature: float = 0.0,
        stage2_do_sample: bool = False,
        generation_prompt_template: str = GENERATION_PROMPT_TEMPLATE,
        output_dir: str | None = None,
        save_intermediate: bool = False,
        intermediate_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.pretrained = pretrained
        self.gen_pretrained = gen_pretrained or "BAAI/Emu3-Gen-hf"
        self.stage1 = dict(height=_as_number(stage1_image_height, "stage1_image_height", int, settings.Side),
                           width=_as_number(stage1_image_width, "stage1_image_width", int, settings.Side),
                           cfg_scale=_as_number(stage1_cfg_scale, "stage1_cfg_scale", float, settings.CfgScale),
                           negative_prompt=stage1_negative_prompt if stage1_negative_prompt is not None
                           else NEGATIVE_PROMPT)
        # Emu3's image length is fixed by its size; stage1_max_new_tokens is accepted for compatibility only.
        self.stage2_max_new_tokens = _as_number(stage2_max_new_tokens, "stage2_max_new_tokens", int)
        self.stage2_temperature = _as_number(stage2_temperature, "stage2_temperature")
        self.stage2_do_sample = _as_bool(stage2_do_sample, "stage2_do_sample")
        self.generation_prompt_template = generation_prompt_template
        self.output_dir = Path(output_dir or "./logs/emu3_vllm_visual_cot")
        self.save_intermediate = _as_bool(save_intermediate, "save_intermediate")
        self.intermediate_dir = Path(intermediate_dir) if intermediate_dir else self.output_dir
        self._kept: dict[str, Any] = {}
        if self.launch.distributed:
            # Under torchrun both engines start now, on every rank alike, and stay: closing an engine there takes
            # the process group down. On GPUs they share the memory unless told otherwise.
            import torch

            if torch.cuda.is_available():
                self.engine_kwargs.setdefault("gpu_memory_utilization", 0.45)
            for checkpoint in (self.gen_pretrained, self.pretrained):
                self._kept.setdefault(checkpoint, self._engine(checkpoint))

    @contextlib.contextmanager
    def _stage(self, checkpoint: str):
        """The engine for one stage: started for the stage and released after it, or the one kept under torchrun."""
        if checkpoint in self._kept:
            yield self._kept[checkpoint]
            return
        with self._engine(checkpoint) as engine:
            yield engine

    def _split(self, context: str) -> tuple[str, str]:
        gen = _GEN_PROMPT.search(context)
        question = _QUESTION.search(context)
        q = question.group(1).strip() if question else context.strip()
        g = gen.group(1).strip() if gen else self.generation_prompt_template.format(question=q)
        return g, q

    def generate_until(self, requests: list[Instance]) -> list[str]:
        docs, ok = self._docs(requests)
        shared, owned = self.launch.share(ok)
        prompts = [self._split(d.context) for d in shared]

        # Stage 1: every auxiliary image in one batch on the Gen engine, then release it.
        aux: dict[int, Any] = {}
        with self._stage(self.gen_pretrained) as gen_engine:
            results = gen_engine.generate_images([p[0] for p in prompts], **self.stage1,
                                                 seed=[self.seed + _doc_seed(d) for d in shared])
        for pos, result in enumerate(results):
            if result.error is None:
                aux[pos] = result.image
            elif pos in owned:
                self._fail(shared[pos], f"{shared[pos].name}: stage 1 failed: {result.error}")
        stage2 = [pos for pos in range(len(shared)) if pos in aux]

        # Stage 2: answer with the original image(s) followed by the auxiliary one.
        with self._stage(self.pretrained) as chat_engine:
            answered = self._understand(
                chat_engine, [shared[p] for p in stage2], [prompts[p][1] for p in stage2],
                [[*shared[p].images, aux[p]] for p in stage2], {i for i, p in enumerate(stage2) if p in owned},
                self.stage2_max_new_tokens, self.stage2_temperature, self.stage2_do_sample)
        answers = {stage2[i]: answer for i, answer in answered.items()}
        mine = {}
        for pos, doc in zip(owned, ok):
            mine[doc.index] = answers.get(pos, "")
            if self.save_intermediate:
                self._save_intermediate(doc, prompts[pos], aux.get(pos), mine[doc.index])
        return [mine.get(d.index, "") for d in docs]

    generate_visual_cot = generate_until

    def _save_intermediate(self, doc: _Doc, prompts: tuple[str, str], image, answer: str) -> None:
        folder = self.intermediate_dir / str(doc.task)
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        if image is not None:
            path = folder / f"{doc.doc_id}_stage1_0.png"
            image.save(path)
            images.append(str(path))
        meta = {"doc_id": doc.doc_id, "task": doc.task, "generation_prompt": prompts[0], "stage1_text": "",
                "generated_images": images, "question": prompts[1], "stage2_answer": answer}
        (folder / f"{doc.doc_id}_metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str))
