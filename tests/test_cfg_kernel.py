"""The fused CFG sampling step: its torch reference (the CPU path) and the Triton kernel against it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.env import subprocess_env

from emu3_vllm.kernels import cfg_sample_reference, cfg_sample_triton, pair_key, triton_available
from emu3_vllm.layout import ImageTokenIds, Slot, layout_tokens, num_image_tokens, slot
from emu3_vllm.vllm_plugin.cfg_step import guided_logprobs


def _ids() -> ImageTokenIds:
    return ImageTokenIds(visual=tuple(range(10, 42)), eol=3, eof=4, eoi=5, eos=6, boi=7, image_wrapper=8)


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (4, 4), (6, 2)])
def test_layout_tokens_agree_with_slot(grid):
    h, w = grid
    ids = _ids()
    k = torch.arange(num_image_tokens(h, w) + 3)
    forced, visual = layout_tokens(k, torch.full_like(k, h), torch.full_like(k, w), ids)
    for position in k.tolist():
        s = slot(position, h, w)
        assert bool(visual[position]) == (s is Slot.VISUAL)
        if s is not Slot.VISUAL:
            assert int(forced[position]) == (ids.slot_token(s) if s is not Slot.DONE else ids.eos)


def _one_pair(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, vocab, generator=g) * 2
    return logits


def _args(p, scale=3.0, temperature=1.0, top_k=0, seed=0, position=0):
    full = lambda v, dt: torch.full((p,), v, dtype=dt)  # noqa: E731
    return dict(scale=full(scale, torch.float32), temperature=full(temperature, torch.float32),
                top_k=full(top_k, torch.long), key=full(pair_key(seed), torch.long),
                position=full(position, torch.long))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (1.3, 12)])
def test_reference_samples_the_guided_top_k_distribution(temperature, top_k):
    """Draws over many positions follow softmax(top-k of guided / T) on the visual slice."""
    lo, hi, draws = 20, 52, 20000
    logits = _one_pair()
    args = _args(draws, temperature=temperature, top_k=top_k)
    args["position"] = torch.arange(draws)
    rows0, rows1 = torch.zeros(draws, dtype=torch.long), torch.ones(draws, dtype=torch.long)
    tokens = cfg_sample_reference(logits, rows0, rows1, lo, hi, **args)
    assert ((tokens >= lo) & (tokens < hi)).all()
    empirical = torch.bincount(tokens - lo, minlength=hi - lo).float() / draws

    x = guided_logprobs(logits[:1], logits[1:], torch.tensor([3.0]))[0, lo:hi] / temperature
    if top_k:
        x = torch.where(x >= torch.topk(x, top_k).values[-1], x, torch.tensor(float("-inf")))
    expected = torch.softmax(x, -1)
    assert (empirical[expected == 0] == 0).all()
    assert (empirical - expected).abs().max() < 0.015, (empirical - expected).abs().max()


def test_reference_greedy_is_the_guided_argmax():
    logits = torch.randn(8, 100)
    cond, uncond = torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])
    tokens = cfg_sample_reference(logits, cond, uncond, 30, 90, **_args(4, temperature=0.0, top_k=5))
    expected = 30 + guided_logprobs(logits[cond], logits[uncond], torch.full((4,), 3.0))[:, 30:90].argmax(-1)
    assert tokens.tolist() == expected.tolist()


def test_a_pair_samples_the_same_token_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(12, 80)
    cond, uncond = torch.arange(0, 12, 2), torch.arange(1, 12, 2)
    args = _args(6, top_k=20)
    args["key"] = torch.tensor([pair_key(s) for s in (5, 6, 7, 8, 9, 10)])
    args["position"] = torch.tensor([3, 9, 0, 4, 4, 100])
    batch = cfg_sample_reference(logits, cond, uncond, 8, 72, **args)
    for p in range(6):
        alone = cfg_sample_reference(logits, cond[p:p + 1], uncond[p:p + 1], 8, 72,
                                     **{k: v[p:p + 1] for k, v in args.items()})
        assert int(alone) == int(batch[p])


def _random_case(pairs: int, vocab: int, lo: int, hi: int, device: str, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * pairs + 1, vocab, generator=g) * 3).to(dtype)
    logits[0, lo + 1] = float("-inf")  # a masked entry, as other processors may leave
    order = torch.randperm(2 * pairs + 1, generator=g)
    args = dict(
        scale=torch.rand(pairs, generator=g) * 4 + 0.5,
        temperature=torch.where(torch.rand(pairs, generator=g) < 0.25, 0.0, torch.rand(pairs, generator=g) + 0.5),
        top_k=torch.randint(-1, hi - lo + 8, (pairs,), generator=g),
        key=torch.tensor([pair_key(seed * 1000 + p) for p in range(pairs)]),
        position=torch.randint(0, 9000, (pairs,), generator=g),
    )
    args["top_k"][:3] = torch.tensor([-1, 0, hi - lo + 5])  # "no top-k" in each spelling
    args["temperature"][3] = 0.0  # and at least one greedy pair
    tensors = dict(logits=logits, cond_rows=order[:pairs], uncond_rows=order[pairs:2 * pairs], **args)
    return {k: v.to(device) for k, v in tensors.items()}


def check_kernel_matches_reference(device: str, pairs: int, vocab: int, lo: int, hi: int, dtype=torch.float32):
    """Equal tokens; float rounding (log-sum-exp, the noise's logarithms) may flip a near-tie in <= 1% of pairs."""
    case = _random_case(pairs, vocab, lo, hi, device, dtype)
    ref = cfg_sample_reference(lo=lo, hi=hi, **case)
    out = cfg_sample_triton(lo=lo, hi=hi, **case)
    assert out.shape == ref.shape and ((out >= lo) & (out < hi)).all()
    differ = (out != ref).nonzero().flatten().tolist()
    assert len(differ) <= max(1, pairs // 100), f"{len(differ)} of {pairs} pairs differ"


@pytest.mark.skipif(not triton_available(), reason="needs Triton with CUDA (or TRITON_INTERPRET=1)")
def test_triton_kernel_matches_reference_here():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # the real shape: Emu3's 184622-token vocabulary, 32768 visual tokens, 128 pairs, bf16
        check_kernel_matches_reference(device, 128, 184622, 151854, 151854 + 32768, torch.bfloat16)
        check_kernel_matches_reference(device, 256, 184622, 151854, 151854 + 32768)
    check_kernel_matches_reference(device, 12, 700, 100, 612)


def test_triton_kernel_matches_reference_in_triton_interpreter():
    """Runs the Triton kernel itself on CPU through Triton's interpreter, so CI checks it without a GPU."""
    pytest.importorskip("triton")
    if triton_available():
        pytest.skip("the test above runs the kernel on this machine directly")
    env = subprocess_env(TRITON_INTERPRET="1")
    here = Path(__file__).resolve()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
                           "-k", "test_triton_kernel_matches_reference_here"], env=env, cwd=here.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
