"""vLLM general-plugin entry point: runs in every vLLM process, so it must stay import-light."""

import os

ARCHITECTURE = "Emu3ForConditionalGeneration"
MODEL_CLASS = "emu3_vllm.vllm_plugin.model:Emu3ForConditionalGeneration"
# Set by front ends that own their process (the CLI): the engine process then dies with its parent, even when the
# parent is SIGKILLed, instead of lingering with the model (and a GPU's memory) loaded.
DIE_WITH_PARENT_ENV = "EMU3_VLLM_ENGINE_DIES_WITH_PARENT"


def register() -> None:
    """Make vLLM load emu3_vllm's native Emu3 instead of its Transformers-backend fallback."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        _engine_core_dies_with_parent()


def _engine_core_dies_with_parent() -> None:
    """In vLLM's engine-core process only: ask Linux to SIGKILL it when its parent dies (its workers already
    follow the engine core)."""
    import multiprocessing
    import sys

    if not sys.platform.startswith("linux") or not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    import ctypes
    import signal

    parent = multiprocessing.parent_process()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the request took effect
        os._exit(1)
