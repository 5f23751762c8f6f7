"""Both Emu3 weight-name layouts map onto the same vLLM parameter names."""

from __future__ import annotations

from safetensors import safe_open


def test_serialized_and_in_memory_names_map_to_the_same_params(checkpoints):
    from emu3_vllm.vllm_plugin.model import Emu3ForConditionalGeneration

    mapper = Emu3ForConditionalGeneration.hf_to_vllm_mapper
    with safe_open(f"{checkpoints['a']}/model.safetensors", "pt") as fh:
        serialized = list(fh.keys())
    # transformers' in-memory names: model.text_model.*, model.vqmodel.*, lm_head.*
    in_memory = []
    for name in serialized:
        if name.startswith("text_model.model."):
            in_memory.append("model.text_model." + name[len("text_model.model."):])
        elif name.startswith("text_model.lm_head."):
            in_memory.append("lm_head." + name[len("text_model.lm_head."):])
        else:
            in_memory.append("model." + name)
    mapped_serialized = [mapper._map_name(n) for n in serialized]
    mapped_in_memory = [mapper._map_name(n) for n in in_memory]
    assert mapped_serialized == mapped_in_memory
    prefixes = ("language_model.model.", "language_model.lm_head.", "vqmodel.")
    assert all(n.startswith(prefixes) for n in mapped_serialized)
    assert "language_model.lm_head.weight" in mapped_serialized
