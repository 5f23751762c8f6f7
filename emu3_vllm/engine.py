"""Engine set-up for Emu3, in one place every front end calls (offline API, CLI, HTTP server, Ray actors).

An Emu3 engine is a vLLM engine plus three choices that must agree with each other and with the platform: which
model runner runs (V1 or Model Runner V2: fixed before the engine starts, so the CFG adapter matches it), which CFG
logits-processor adapter it loads, and which pair-aware scheduler keeps the CFG halves in lockstep. On CPU it also
gets the defaults a small machine needs (KV cache size, per-rank OpenMP binding for tensor parallelism).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .inputs import ItemError

logger = logging.getLogger("emu3_vllm")

# The CFG adapters by runner (both wrap `cfg.guide_pairs`), as vLLM's `module:Class` names so the same value serves
# `vllm.LLM(logits_processors=...)` and `--logits-processors` on the server command line.
CFG_PROCESSORS = {False: "emu3_vllm.cfg_processor:Emu3CfgLogitsProcessor",
                  True: "emu3_vllm.cfg_processor_v2:Emu3CfgLogitsProcessorV2"}
PAIR_SCHEDULERS = {False: "emu3_vllm.scheduler.PairAwareScheduler",
                   True: "emu3_vllm.scheduler.PairAwareAsyncScheduler"}
CPU_KVCACHE_GIB = "1"  # vLLM's CPU default reserves 4 GiB per engine; Emu3's small checkpoints need far less
# How long a closing CPU engine's processes get before they are killed. Their work is done within a second of the
# request; what follows is the interpreter tearing down vLLM's and torch's modules (4-5 s of garbage collection),
# which vLLM would otherwise wait out for 5 s on every close. A GPU engine keeps vLLM's default: its processes
# release device memory while they exit.
CPU_SHUTDOWN_GRACE_S = 1.0


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


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_thread_binding(ranks: int, cores: list[int] | None = None) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` giving each of `ranks` engine ranks its own contiguous share of this process's
    cores ("0|1" for 2 ranks on 2 cores); vLLM's automatic binding asks for one NUMA node per rank instead."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"{ranks} engine ranks (tensor x data parallel) need at least one CPU core each; this "
                         f"process may use {len(cores)}")
    share, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        size = share + (rank < extra)
        group = cores[start:start + size]
        start += size
        groups.append(str(group[0]) if size == 1 else f"{group[0]}-{group[-1]}")
    return "|".join(groups)


def apply_cpu_defaults(engine_kwargs: dict[str, Any]) -> None:
    """Environment defaults for CPU engines; anything the user set wins.

    Every rank on this machine (tensor-parallel ranks of each data-parallel engine the server starts) gets its own
    share of the cores: vLLM maps the binding's groups to ranks in (data-parallel, tensor-parallel) order, while
    its automatic binding would put every data-parallel engine on the same core.
    """
    if not on_cpu():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    tp = int(engine_kwargs.get("tensor_parallel_size") or 1)
    dp = int(engine_kwargs.get("data_parallel_size_local") or engine_kwargs.get("data_parallel_size") or 1)
    if tp * dp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tp * dp)


def emu3_engine_kwargs(engine_kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """vLLM engine kwargs for an Emu3 engine, and whether it runs Model Runner V2.

    Fills in the CFG logits processor for the pinned runner and the pair-aware scheduler for the engine's scheduling
    mode (vLLM schedules asynchronously by default except on CPU, and a synchronous scheduler class would switch
    that off), unless given; applies the CPU defaults.
    """
    kwargs = dict(engine_kwargs)
    apply_cpu_defaults(kwargs)
    v2 = pin_model_runner()
    kwargs.setdefault("logits_processors", [CFG_PROCESSORS[v2]])
    asynchronous = kwargs.get("async_scheduling") is not False and not on_cpu()
    kwargs.setdefault("scheduler_cls", PAIR_SCHEDULERS[asynchronous])
    return kwargs, v2


def check_engine_kwargs(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments checked against vLLM's own `EngineArgs` fields and their types, without
    starting anything: a ValueError naming the argument for an unknown name or a value of the wrong type. The
    engine seed must also fit numpy's global seed, which vLLM's worker sets (an engine dies of a bad one)."""
    import dataclasses
    import inspect
    import sys

    from pydantic import TypeAdapter, ValidationError
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    from .settings import EngineSeed, SettingsError, check_value, show

    fields = {field.name: field for field in dataclasses.fields(EngineArgs)}
    # `LLM` takes a few arguments of its own besides the engine's.
    names = (fields.keys() | inspect.signature(LLM.__init__).parameters.keys()) - {"self", "model", "kwargs"}
    checked = {}
    for name, value in engine_kwargs.items():
        if name not in names:
            raise ValueError(f"{name}: not a vLLM engine argument (see vllm.EngineArgs)")
        if name == "seed":
            try:
                checked[name] = check_value(EngineSeed, value, name)
            except SettingsError as exc:
                raise ValueError(str(exc)) from None
            continue
        if name not in fields:
            checked[name] = value
            continue
        annotation = fields[name].type
        try:
            if isinstance(annotation, str):
                annotation = eval(annotation, vars(sys.modules[EngineArgs.__module__]))  # noqa: S307 - vLLM's own
            adapter = TypeAdapter(annotation)
        except Exception:  # noqa: BLE001 - a type pydantic cannot express: vLLM checks it when the engine starts
            checked[name] = value
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"{name}: {exc.errors(include_url=False)[0]['msg']}, got {show(value)}") from None
        checked[name] = value
    return checked


def head_size(model: str) -> int | None:
    """The attention head size of a local checkpoint's text model (None for a hub id or an unreadable config)."""
    import json

    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or config
    if text.get("head_dim"):
        return int(text["head_dim"])
    if text.get("hidden_size") and text.get("num_attention_heads"):
        return int(text["hidden_size"]) // int(text["num_attention_heads"])
    return None


def check_kv_cache(model: str, kv_cache_dtype: Any) -> None:
    """An FP8 KV cache that vLLM's CPU attention would refuse only inside the started engine (a traceback from its
    worker), refused now in one line: it needs AVX-512 or AMX, and a head size divisible by 32."""
    if not isinstance(kv_cache_dtype, str) or not kv_cache_dtype.startswith("fp8") or not on_cpu():
        return
    import torch

    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype}: vLLM stores an FP8 KV cache on a CPU only with AVX-512 or "
                         "AMX, and this CPU has neither; leave kv_cache_dtype at auto")
    size = head_size(model)
    if size is not None and size % 32:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype}: vLLM's CPU attention needs a head size divisible by 32 "
                         f"for an FP8 KV cache, and {model} has {size}; leave kv_cache_dtype at auto")


def start_llm(model: str, *, seed: int = 0, **engine_kwargs: Any):
    """A `vllm.LLM` set up for Emu3 (see `emu3_engine_kwargs`), and whether it runs Model Runner V2."""
    from vllm import LLM

    binding_given = "VLLM_CPU_OMP_THREADS_BIND" in os.environ
    kwargs, v2 = emu3_engine_kwargs(engine_kwargs)
    try:
        llm = LLM(model=model, seed=seed, **kwargs)
    finally:
        # The binding chosen for this engine's ranks is read while the engine starts; left behind, it would be
        # wrong for the next engine this process (or a child of it) starts with another tensor-parallel size:
        # vLLM refuses a two-group binding for a one-rank engine.
        if not binding_given:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    limits = EngineLimits.of(llm.llm_engine.vllm_config)
    if not limits.pair_scheduler:
        logger.warning("scheduler %s is not emu3_vllm's pair-aware scheduler: CFG pairs may fall out of lockstep "
                       "(such images fail with an error)", llm.llm_engine.vllm_config.scheduler_config.scheduler_cls)
    return llm, v2


def shutdown_llm(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now (see `CPU_SHUTDOWN_GRACE_S`)."""
    llm.llm_engine.engine_core.shutdown(timeout=CPU_SHUTDOWN_GRACE_S if on_cpu() else None)


class DataParallelLockstep:
    """Stepping an engine that is one data-parallel rank of several under vLLM's `external_launcher` (torchrun).

    There every engine step is a collective across the data-parallel ranks, so each rank must take the same number
    of steps: a rank with nothing to do runs vLLM's dummy batch while another still has work, and all ranks agree
    (one all-reduce per step, as `LLM.generate` does) on when everyone is done.
    """

    def __init__(self, engine, group):
        self.engine = engine
        self.group = group

    @classmethod
    def of(cls, llm) -> DataParallelLockstep | None:
        engine = llm.llm_engine
        if getattr(engine, "external_launcher_dp", False) and getattr(engine, "dp_group", None) is not None:
            return cls(engine, engine.dp_group)
        return None

    def any_rank_busy(self, busy: bool) -> bool:
        """Whether any rank (this one included) still has work; every rank must call this at the same point."""
        from vllm.config import ParallelConfig

        return ParallelConfig.has_unfinished_dp(self.group, busy)

    def step(self, has_requests: bool) -> list:
        """One step in step with the other ranks: a real one when this engine holds requests, else a dummy batch."""
        if has_requests:
            return self.engine.step()
        self.engine.engine_core.execute_dummy_batch()
        return []


def abort(engine, request_ids: list[str]) -> None:
    """Abort requests by the ids `LLM.enqueue` returned. The engine may already be gone (Ctrl-C in a terminal
    reaches its processes too); then there is nothing left to abort."""
    if not request_ids:
        return
    try:
        engine.abort_request(request_ids, internal=True)
    except Exception as exc:  # noqa: BLE001 - cleanup must not replace the exception that got us here
        logger.debug("could not abort %d requests: %s", len(request_ids), exc)


@dataclass(frozen=True)
class EngineLimits:
    """What an image must fit in, read from a running engine's config."""

    max_model_len: int
    kv_blocks: int | None
    block_size: int
    max_batched_tokens: int
    max_num_seqs: int
    pair_scheduler: bool

    @classmethod
    def of(cls, vllm_config) -> EngineLimits:
        scheduler_cls = vllm_config.scheduler_config.scheduler_cls
        name = str(getattr(scheduler_cls, "__name__", scheduler_cls))
        return cls(max_model_len=vllm_config.model_config.max_model_len,
                   kv_blocks=vllm_config.cache_config.num_gpu_blocks,
                   block_size=vllm_config.cache_config.block_size,
                   max_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
                   max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
                   pair_scheduler="PairAware" in name)

    def check_image(self, where: str, cond_len: int, uncond_len: int, num_tokens: int, height: int,
                    width: int, *, bare_len: int = 0) -> None:
        """An `ItemError` if a CFG pair with these prompt lengths can never run on this engine, naming what to
        change: `size` only when the image cannot fit even after prompts of `bare_len` tokens (a prompt with no
        text: BOS and the image header), else the longer of `prompt` and `negative_prompt`."""
        from vllm.utils.math_utils import cdiv

        def blocks(cond: int, uncond: int) -> int:
            return cdiv(cond + num_tokens, self.block_size) + cdiv(uncond + num_tokens, self.block_size)

        # The halves share the image; whichever prompt is longer is the one that does not fit.
        longer = ("prompt", cond_len) if cond_len >= uncond_len else ("negative_prompt", uncond_len)
        image = f"a {width}x{height} (width x height) image's {num_tokens} tokens"
        if longer[1] + num_tokens > self.max_model_len:
            if bare_len + num_tokens > self.max_model_len:
                raise ItemError(f"{where}: size is too large for this server: {image} after a {bare_len}-token "
                                f"header need {bare_len + num_tokens} positions, beyond max_model_len "
                                f"{self.max_model_len}", "size")
            raise ItemError(f"{where}: {longer[0]} is too long for this server: {longer[1]} prompt tokens and "
                            f"{image} need {longer[1] + num_tokens} positions, beyond max_model_len "
                            f"{self.max_model_len}", longer[0])
        if self.kv_blocks is not None and blocks(cond_len, uncond_len) > self.kv_blocks:
            if blocks(bare_len, bare_len) > self.kv_blocks:
                raise ItemError(f"{where}: size is too large for this server: the two CFG halves of {image} need "
                                f"{blocks(bare_len, bare_len)} KV blocks; the cache has {self.kv_blocks} (raise the "
                                "KV cache size)", "size")
            raise ItemError(f"{where}: {longer[0]} is too long for this server: with {image} the two CFG halves "
                            f"need {blocks(cond_len, uncond_len)} KV blocks; the cache has {self.kv_blocks}",
                            longer[0])
        if self.pair_scheduler and cond_len + uncond_len > self.max_batched_tokens:
            raise ItemError(f"{where}: {longer[0]} is too long for this server: the two prompts "
                            f"({cond_len + uncond_len} tokens) exceed max_num_batched_tokens "
                            f"{self.max_batched_tokens}", longer[0])


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(model: str | os.PathLike) -> str:
    """The model argument, checked without loading anything: an existing checkpoint folder, or a hub id.

    A path that does not exist and does not look like `org/name` is a typo, not a hub id: say so plainly.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model {text}: not a checkpoint folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {text}: no config.json there, so it is not a checkpoint folder")
        return text
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text  # resolved by transformers / vLLM from the model hub or its cache
    raise FileNotFoundError(f"model {text}: no such checkpoint folder")
