"""One CFG step for a batch of Emu3 image pairs, as tensor operations shared by both vLLM runner adapters.

For each pair (its cond and uncond logit rows, its generated length so far): a single-token layout slot (EOL,
EOF, EOI, EOS) forces its token; a visual slot is guided, masked to the visual tokens and sampled in one fused
pass (`emu3_vllm.kernels.cfg_sample`: the Triton kernel on CUDA, its torch reference elsewhere); a pair out of
lockstep is ended with EOS. The chosen token goes into both rows as a one-hot row (0 at the token, -inf
elsewhere), so the engine's own sampler must emit it for both halves. No per-pair Python: the step costs the
same handful of tensor operations at 2 pairs or 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emu3_vllm.kernels import cfg_sample, pair_key
from emu3_vllm.kernels.cfg_sample import guided_logprobs
from emu3_vllm.layout import ImageTokenIds, layout_tokens

__all__ = ["PairBatch", "guide_pairs", "guided_logprobs", "pair_key", "write_one_hot"]


@dataclass
class PairBatch:
    """[P] tensors on the logits' device describing the pairs of one step."""

    cond_rows: torch.Tensor  # long: row of each pair's cond half in the logits
    uncond_rows: torch.Tensor  # long
    position: torch.Tensor  # long: tokens generated so far (the cond half's count)
    in_step: torch.Tensor  # bool: both halves present with equal counts, and never failed before
    h: torch.Tensor  # long
    w: torch.Tensor  # long
    scale: torch.Tensor  # float
    temperature: torch.Tensor  # float, 0 = greedy
    top_k: torch.Tensor  # long, <= 0 = no top-k
    key: torch.Tensor  # long: `pair_key(seed)`


def write_one_hot(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """Rows that leave the engine's sampler no choice: 0 at the token, -inf elsewhere (in place)."""
    logits.index_fill_(0, rows, float("-inf"))
    logits[rows, tokens] = 0.0


def guide_pairs(logits: torch.Tensor, batch: PairBatch, ids: ImageTokenIds) -> torch.Tensor:
    """Choose every pair's next token and force it into both of its rows; returns the chosen [P] token ids."""
    forced, visual = layout_tokens(batch.position, batch.h, batch.w, ids)
    lo, hi = ids.visual_range
    sampled = cfg_sample(logits, batch.cond_rows, batch.uncond_rows, lo, hi, batch.scale, batch.temperature,
                         batch.top_k, batch.key, batch.position)
    token = torch.where(visual, sampled, forced)
    token = torch.where(batch.in_step, token, torch.full_like(token, ids.eos))
    write_one_hot(logits, torch.cat([batch.cond_rows, batch.uncond_rows]), torch.cat([token, token]))
    return token
