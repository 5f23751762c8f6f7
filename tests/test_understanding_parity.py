"""Greedy understanding through our vLLM model is token-identical to transformers' Emu3 generate."""

from __future__ import annotations

import pytest
import torch
from helpers.engines import random_image

from emu3_vllm.testing.hf_reference import hf_understand

pytestmark = pytest.mark.engine

MAX_NEW_TOKENS = 12

CASES = {
    "text-only": [("Describe a cat.", []), ("What is 2+2?", []), ("Tell me a story about emus", [])],
    "one-image": [("What is in the picture?", [random_image(48, 48, seed=1)])],
    "two-images-different-sizes": [("Compare <image> and <image>", [random_image(40, 72, seed=2),
                                                                  random_image(56, 40, seed=3)])],
    "non-square": [("Describe.", [random_image(40, 72, seed=4)])],
}


def hf_greedy(hf, text: str, images: list) -> list[int]:
    model, processor = hf
    return hf_understand(model, processor, text, images, max_new_tokens=MAX_NEW_TOKENS)


def strip_eos(ids, eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.mark.parametrize("shape", ["a", "b"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(engine_factory, hf_factory, shape, case):
    engine, hf = engine_factory(shape), hf_factory(shape)
    items = CASES[case]
    answers = engine.understand([(t, imgs) for t, imgs in items], max_new_tokens=MAX_NEW_TOKENS, use_tqdm=False)
    eos = hf[1].tokenizer.eos_token_id
    for (text, images), answer in zip(items, answers):
        assert answer.error is None, answer.error
        expected = hf_greedy(hf, text, images)
        assert strip_eos(answer.token_ids, eos) == strip_eos(expected, eos), (case, text)


def test_engine_runs_native_model(engine_factory):
    """vLLM loaded emu3_vllm's model, not its Transformers-backend fallback."""
    assert engine_factory("a").model_class() == "emu3_vllm.vllm_plugin.model:Emu3ForConditionalGeneration"


@pytest.mark.parametrize("shape", ["a", "b"])
def test_vq_encoder_matches_transformers(engine_factory, hf_factory, shape):
    engine, (model, processor) = engine_factory(shape), hf_factory(shape)
    images = [random_image(40, 72, seed=5), random_image(64, 32, seed=6)]
    ours = engine.image_tokens(images)
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"]).tolist()
    assert [t for img in ours for t in img] == ref
    for _single, image in zip(ours, images):  # one image alone: no padding from the other
        alone = processor.image_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            ref_alone = model.model.get_image_tokens(alone["pixel_values"], alone["image_sizes"]).tolist()
        assert engine.image_tokens([image])[0] == ref_alone
