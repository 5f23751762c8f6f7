"""lmms-eval registration (`lmms_eval.models` entry point). Kept light: no torch or vLLM import here."""

MODELS = {
    "emu3_vllm": "emu3_vllm.lmms.adapters.Emu3VLLM",
    "emu3_vllm_visual_cot": "emu3_vllm.lmms.adapters.Emu3VLLMVisualCoT",
}


def get_manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=model_id, simple_class_path=path) for model_id, path in MODELS.items()]
