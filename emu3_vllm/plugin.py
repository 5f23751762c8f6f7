"""vLLM general-plugin entry point: runs in every vLLM process, so it must stay import-light."""

ARCHITECTURE = "Emu3ForConditionalGeneration"
MODEL_CLASS = "emu3_vllm.model:Emu3ForConditionalGeneration"


def register() -> None:
    """Make vLLM load emu3_vllm's native Emu3 instead of its Transformers-backend fallback."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
