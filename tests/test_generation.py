"""CFG text-to-image through vLLM: parity with transformers, lockstep under pressure, per-item errors."""

from __future__ import annotations

import math

import pytest
import torch

from emu3_vllm.layout import parse_image_tokens
from emu3_vllm.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX
from emu3_vllm.testing.hf_reference import hf_generate_image_tokens
from emu3_vllm.vllm_plugin.cfg_step import guided_logprobs

PROMPTS = ["a red emu", "a cat sitting on a mat", "mountains at dusk, oil painting"]


def hf_cfg_greedy(hf, cond: str, uncond: str, h: int, w: int, scale: float, ids) -> list[int]:
    model, processor = hf
    return hf_generate_image_tokens(model, processor.tokenizer, cond, uncond, h, w, scale, ids)


@pytest.mark.engine
@pytest.mark.parametrize("shape", ["a", "b"])
@pytest.mark.parametrize("scale", [1.5, 3.0])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_greedy_cfg_matches_transformers(engine_factory, hf_factory, shape, scale, grid):
    engine, hf = engine_factory(shape), hf_factory(shape)
    h, w = grid
    results = engine.generate_images(PROMPTS, height=h * 8, width=w * 8, cfg_scale=scale, temperature=0.0,
                                     seed=0, use_tqdm=False)
    for prompt, result in zip(PROMPTS, results):
        assert result.error is None, result.error
        assert result.image.size == (w * 8, h * 8)
        cond, uncond = engine.image_generation_prompts(prompt, h, w, NEGATIVE_PROMPT, POSITIVE_SUFFIX)
        ref = hf_cfg_greedy(hf, cond, uncond, h, w, scale, engine.token_ids)
        assert parse_image_tokens(ref, h, w, engine.token_ids) == result.codes, prompt


def test_guided_distribution_matches_transformers_processor(hf_factory):
    """Our CFG combine equals transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor within 1e-4."""
    from transformers.generation import UnbatchedClassifierFreeGuidanceLogitsProcessor

    model, processor = hf_factory("a")
    tok = processor.tokenizer
    cond_ids = tok(tok.bos_token + "a red emu" + POSITIVE_SUFFIX + "<|image start|>4*4<|image token|>",
                   return_tensors="pt", add_special_tokens=False).input_ids
    uncond_ids = tok(tok.bos_token + NEGATIVE_PROMPT + "<|image start|>4*4<|image token|>",
                     return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        cond_logits = model(input_ids=cond_ids).logits[:, -1].float()
        uncond_logits = model(input_ids=uncond_ids).logits[:, -1].float()
        for scale in (1.5, 3.0):
            ref_proc = UnbatchedClassifierFreeGuidanceLogitsProcessor(scale, model, unconditional_ids=uncond_ids)
            ref = ref_proc(cond_ids, cond_logits.clone())
            ours = guided_logprobs(cond_logits, uncond_logits, torch.tensor([scale]))
            assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
            assert torch.allclose(torch.log_softmax(ours, -1), torch.log_softmax(ref, -1), atol=1e-4)


def test_no_nan_where_both_rows_are_masked():
    cond = torch.tensor([[0.0, float("-inf"), 1.0]])
    uncond = torch.tensor([[0.5, float("-inf"), float("-inf")]])
    out = guided_logprobs(cond, uncond, torch.tensor([3.0]))
    assert not torch.isnan(out).any()
    assert math.isinf(out[0, 1]) and math.isinf(out[0, 2]) and math.isfinite(out[0, 0])


@pytest.mark.engine
def test_bad_generation_items_do_not_sink_the_batch(engine_factory):
    engine = engine_factory("a")
    good = engine.generate_images(["a red emu"], height=32, width=32, seed=5, use_tqdm=False)[0]
    assert good.error is None
    cases = [
        ("", "prompt is empty"),
        ("   ", "prompt is empty"),
        (123, "prompt must be a string"),
        ({"prompt": "x", "cfg_scale": 0}, "cfg_scale"),
        ({"prompt": "x", "cfg_scale": -1.0}, "cfg_scale"),
        ({"prompt": "x", "cfg_scale": float("nan")}, "cfg_scale"),
        ({"prompt": "x", "height": 0}, "height must be a positive integer"),
        ({"prompt": "x", "width": -8}, "width must be a positive integer"),
        ({"prompt": "x", "height": 2048, "width": 2048}, "max_model_len"),
    ]
    prompts = ["a red emu"] + [bad for bad, _ in cases] + [{"prompt": "a red emu", "seed": 5}]
    results = engine.generate_images(prompts, height=32, width=32, seed=5, use_tqdm=False)
    for i, (_, fragment) in enumerate(cases, start=1):
        assert results[i].error is not None and f"item {i}" in results[i].error, results[i].error
        assert fragment in results[i].error, results[i].error
        assert results[i].image is None
    for ok in (results[0], results[-1]):
        assert ok.error is None and ok.image is not None
        assert ok.codes == good.codes  # seed 5 both times: the bad items change nothing


@pytest.mark.engine
def test_seed_gives_the_same_image_whatever_the_batch(engine_factory):
    engine = engine_factory("a")
    batch = engine.generate_images(PROMPTS, height=32, width=40, seed=[11, 12, 13], use_tqdm=False)
    alone = engine.generate_images([PROMPTS[1]], height=32, width=40, seed=12, use_tqdm=False)[0]
    assert batch[1].codes == alone.codes
    assert batch[0].codes != batch[1].codes


@pytest.mark.engine
def test_negative_prompt_is_prefilled_once_and_cuda_graphs_are_left_alone(engine_factory, checkpoints):
    """Prefix caching serves the shared negative prompt to every uncond half after the first."""
    import inspect

    from emu3_vllm import Emu3

    engine = engine_factory("a")
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    first = engine.generate_images(["a red emu"], height=32, width=32, seed=1, use_tqdm=False)[0]
    later = engine.generate_images(["a blue emu", "a green emu"], height=32, width=32, seed=1, use_tqdm=False)
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    uncond_len = engine._prompt_len(engine.image_generation_prompts("x", 4, 4, NEGATIVE_PROMPT, POSITIVE_SUFFIX)[1])
    for result in later:
        assert result.error is None
        assert result.cached_prompt_tokens >= (uncond_len - 1) // block * block > 0
    assert first.prompt_tokens > 0
    # emu3_vllm never turns vLLM's CUDA graphs off itself (the tests choose enforce_eager for CPU start-up time).
    assert "enforce_eager" not in inspect.getsource(Emu3.__init__)


@pytest.mark.engine
def test_a_half_the_engine_rejects_does_not_strand_its_twin(engine_factory, monkeypatch):
    """If the engine refuses an uncond half after accepting its cond half, the cond half is aborted: the call
    returns (the scheduler would otherwise hold it forever for a twin that never comes) and the rest is served."""
    engine = engine_factory("a")
    real_enqueue = engine.llm.enqueue

    def enqueue(prompt, *args, **kwargs):
        if "REFUSED" in prompt["prompt"]:
            raise ValueError("refused for the test")
        return real_enqueue(prompt, *args, **kwargs)

    monkeypatch.setattr(engine.llm, "enqueue", enqueue)
    results = engine.generate_images([{"prompt": "a red emu", "negative_prompt": "REFUSED"}, "a red emu"],
                                     height=32, width=32, seed=5, use_tqdm=False)
    assert results[0].error is not None and "item 0: rejected by the engine" in results[0].error
    assert results[1].error is None and results[1].image is not None
