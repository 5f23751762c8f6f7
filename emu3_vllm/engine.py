"""Engine set-up for Emu3, in one place every front end calls (offline API, CLI, HTTP server, Ray actors).

An Emu3 engine is a vLLM engine plus three choices that must agree with each other and with the platform: which
model runner runs (V1 or Model Runner V2: fixed before the engine starts, so the CFG adapter matches it), which CFG
logits-processor adapter it loads, and which pair-aware scheduler keeps the CFG halves in lockstep. On CPU it also
gets the defaults a small machine needs (KV cache size, per-rank OpenMP binding for tensor parallelism).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("emu3_vllm")

# The CFG adapters by runner (both wrap `cfg_step.guide_pairs`), as vLLM's `module:Class` names so the same value serves
# `vllm.LLM(logits_processors=...)` and `--logits-processors` on the server command line.
CFG_PROCESSORS = {False: "emu3_vllm.vllm_plugin.cfg_processor_v1:Emu3CfgLogitsProcessor",
                  True: "emu3_vllm.vllm_plugin.cfg_processor_v2:Emu3CfgLogitsProcessorV2"}
PAIR_SCHEDULERS = {False: "emu3_vllm.vllm_plugin.pair_scheduler.PairAwareScheduler",
                   True: "emu3_vllm.vllm_plugin.pair_scheduler.PairAwareAsyncScheduler"}
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

    from emu3_vllm.settings import EngineSeed, SettingsError, check_value, show

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


def cpu_holds_fp8_kv() -> bool:
    """Whether vLLM's CPU attention can store an FP8 KV cache on this CPU: its FP8 kernels need AVX-512 or AMX."""
    import torch

    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def check_kv_cache(model: str, kv_cache_dtype: Any) -> None:
    """An FP8 KV cache that vLLM's CPU attention would refuse only inside the started engine (a traceback from its
    worker), refused now in one line: it needs AVX-512 or AMX, and a head size divisible by 32."""
    if not isinstance(kv_cache_dtype, str) or not kv_cache_dtype.startswith("fp8") or not on_cpu():
        return
    if not cpu_holds_fp8_kv():
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
    from emu3_vllm.offline.items import EngineLimits

    if not EngineLimits.of(llm.llm_engine.vllm_config).pair_scheduler:
        logger.warning("scheduler %s is not emu3_vllm's pair-aware scheduler: CFG pairs may fall out of lockstep "
                       "(such images fail with an error)", llm.llm_engine.vllm_config.scheduler_config.scheduler_cls)
    return llm, v2


def shutdown_llm(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now (see `CPU_SHUTDOWN_GRACE_S`)."""
    llm.llm_engine.engine_core.shutdown(timeout=CPU_SHUTDOWN_GRACE_S if on_cpu() else None)
