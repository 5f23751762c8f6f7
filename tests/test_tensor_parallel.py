"""Tensor parallelism: two ranks give the same answers and the same images as one, and on CPU each rank gets its own
cores without the user setting anything (vLLM's automatic binding wants one NUMA node per rank)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.engines import ENGINE_KWARGS, random_image


def test_cpu_binding_gives_each_rank_its_own_cores_unless_the_user_chose(monkeypatch):
    from emu3_vllm.engine import apply_cpu_defaults, cpu_thread_binding, on_cpu

    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [4, 0, 1, 2, 3]) == "0-2|3-4"
    assert cpu_thread_binding(1, [0, 1]) == "0-1"
    with pytest.raises(ValueError, match="at least one CPU core each"):
        cpu_thread_binding(3, [0, 1])
    if not on_cpu():
        pytest.skip("the binding is a CPU setting")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    apply_cpu_defaults({"tensor_parallel_size": 1})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # one rank: vLLM's own binding works
    apply_cpu_defaults({"tensor_parallel_size": 2})
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cpu_thread_binding(2)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")
    apply_cpu_defaults({"tensor_parallel_size": 2})
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"


@pytest.mark.engine
def test_two_ranks_answer_and_draw_exactly_as_one(checkpoints, engine_factory):
    import torch

    from emu3_vllm import Emu3

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    config = json.loads((Path(checkpoints["a"]) / "config.json").read_text())
    text = config.get("text_config", config)
    assert text["num_attention_heads"] % 2 == 0 and text["num_key_value_heads"] % 2 == 0, text

    one = engine_factory("a")
    questions = [("Describe the picture.", [random_image(48, 48, seed=1)]),
                 ("Compare <image> with <image>", [random_image(40, 72, seed=2), random_image(64, 32, seed=3)]),
                 "Say hello in three words."]
    prompts = ["a red emu in the desert", "a city skyline at night", "a bowl of fruit"]
    binding_before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    with Emu3(checkpoints["a"], tensor_parallel_size=2, **ENGINE_KWARGS) as two:
        # The binding was chosen for this engine's start only: a one-rank engine started next must not inherit it.
        assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == binding_before
        answers = [two.understand(questions, max_new_tokens=12, use_tqdm=False),
                   one.understand(questions, max_new_tokens=12, use_tqdm=False)]
        images = [e.generate_images(prompts, height=32, width=48, cfg_scale=3.0, seed=11, use_tqdm=False)
                  for e in (two, one)]
    assert all(a.error is None for a in answers[0] + answers[1])
    assert [a.token_ids for a in answers[0]] == [a.token_ids for a in answers[1]]
    assert all(r.error is None for r in images[0] + images[1])
    assert [r.codes for r in images[0]] == [r.codes for r in images[1]]  # sampled (temperature 1) CFG codes
