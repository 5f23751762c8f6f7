"""Classifier-free guidance for Emu3 image tokens: one pure tensor function over a batch of pairs.

guided = log_softmax(u) + s * (log_softmax(c) - log_softmax(u)), the log-softmax form transformers'
`UnbatchedClassifierFreeGuidanceLogitsProcessor` and Emu3's official script use, computed only where both are
finite (no NaN from -inf - -inf); then the layout mask; then sampling. Each pair samples with its own generator
keyed by (seed, position), so an image depends on its seed only, never on what else is in the batch.
"""

from __future__ import annotations

import torch

DEFAULT_TOP_K = 2048


def guided_logprobs(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[P, V] guided scores for P pairs of cond/uncond logit rows; `scale` is [P]."""
    c = torch.log_softmax(cond.float(), dim=-1)
    u = torch.log_softmax(uncond.float(), dim=-1)
    finite = torch.isfinite(c) & torch.isfinite(u)
    s = scale.to(c.dtype).reshape(-1, 1)
    guided = u + s * (c - u)
    return torch.where(finite, guided, torch.full_like(guided, float("-inf")))


def apply_allowed_mask(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """-inf outside `allowed` ([P, V] bool)."""
    return scores.masked_fill(~allowed, float("-inf"))


def pair_generator(seed: int, position: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one pair at one position: a pure function of (seed, position)."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(position) * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def sample_tokens(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  seeds: list[int], positions: list[int]) -> torch.Tensor:
    """One token per row of `scores` ([P, V], masked guided scores); greedy where temperature is 0."""
    out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for i in range(scores.shape[0]):
        row = scores[i]
        t = float(temperature[i])
        if t <= 0.0:
            out[i] = torch.argmax(row)
            continue
        row = row / t
        k = int(top_k[i])
        if 0 < k < row.shape[0]:
            kth = torch.topk(row, k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        # Sampling on CPU keeps a seed's draws identical across devices and batch compositions.
        gen = pair_generator(seeds[i], positions[i])
        out[i] = torch.multinomial(probs.cpu(), 1, generator=gen).to(out.device)[0]
    return out


def cfg_step(cond: torch.Tensor, uncond: torch.Tensor, allowed: torch.Tensor, scale: torch.Tensor,
             temperature: torch.Tensor, top_k: torch.Tensor, seeds: list[int], positions: list[int]) -> torch.Tensor:
    """Guide, mask and sample one step for P pairs; returns the [P] chosen token ids."""
    scores = apply_allowed_mask(guided_logprobs(cond, uncond, scale), allowed)
    return sample_tokens(scores, temperature, top_k, seeds, positions)


def one_hot_rows(tokens: torch.Tensor, vocab_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Rows that leave the engine's sampler no choice: 0 at the token, -inf elsewhere."""
    rows = torch.full((tokens.shape[0], vocab_size), float("-inf"), dtype=dtype, device=device)
    rows.scatter_(1, tokens.reshape(-1, 1).to(device), 0.0)
    return rows
