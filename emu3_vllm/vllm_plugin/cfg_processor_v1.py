"""CFG for Emu3 image generation inside vLLM's sampler: the V1 model-runner adapter.

Each image is two requests tagged as a pair (`cfg_pairs.py`): the conditional half and its unconditional twin. Every
step the adapter finds both rows of each pair, checks they are in lockstep (both present, same number of generated
tokens) and hands the batch to `cfg_step.guide_pairs`, which writes the chosen token into both rows. A pair out of
lockstep is a bug upstream (scheduling): both halves are ended at once with EOS where the layout does not allow it,
and the caller reports that image as failed instead of emitting a wrong image.

Pair bookkeeping is rebuilt only when the batch changes (requests added, removed or moved); a steady decode step
costs one `len` per row (vLLM's live output lists, read in C by `map`) and the tensor step.
`cfg_processor_v2.py` adapts the same step to Model Runner V2's interface.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from emu3_vllm.cfg_pairs import COND, UNCOND, PairHalf, pair_half, validate_cfg_args
from emu3_vllm.layout import ImageTokenIds
from emu3_vllm.vllm_plugin.cfg_step import PairBatch, guide_pairs, write_one_hot


def token_ids_from_config(hf_config) -> ImageTokenIds:
    vocab = hf_config.vocabulary_map
    text = hf_config.text_config
    name_of = {v: k for k, v in vocab.items()}
    eos = text.eos_token_id[0] if isinstance(text.eos_token_id, (list, tuple)) else text.eos_token_id
    pad = name_of.get(text.pad_token_id)
    return ImageTokenIds.from_vocabulary(vocab, eos_token=name_of[eos], pad_token=pad)


class _Pairs:
    """The batch's pairs, laid out as tensors; rebuilt when the batch changes."""

    def __init__(self, rows: dict[int, PairHalf], failed: set[str], device: torch.device):
        by_pair: dict[str, dict[str, int]] = {}
        for index, half in rows.items():
            by_pair.setdefault(half.pair, {})[half.role] = index
        cond, uncond, halves, lone = [], [], [], []
        for pair, roles in by_pair.items():
            c, u = roles.get(COND), roles.get(UNCOND)
            if c is None or u is None:  # a half without its twin can never be guided
                failed.add(pair)
                lone.extend(i for i in (c, u) if i is not None)
                continue
            cond.append(c)
            uncond.append(u)
            halves.append(rows[c])

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        self.pairs = [h.pair for h in halves]
        self.cond_outputs = [rows[c].output_ids for c in cond]
        self.uncond_outputs = [rows[u].output_ids for u in uncond]
        self.failed = torch.tensor([p in failed for p in self.pairs], dtype=torch.bool)
        self.cond_rows, self.uncond_rows = dev(cond, torch.long), dev(uncond, torch.long)
        self.lone_rows = dev(lone, torch.long)
        self.h = dev([h.h for h in halves], torch.long)
        self.w = dev([h.w for h in halves], torch.long)
        self.scale = dev([h.scale for h in halves], torch.float32)
        self.temperature = dev([h.temperature for h in halves], torch.float32)
        self.top_k = dev([h.top_k for h in halves], torch.long)
        self.key = dev([h.key for h in halves], torch.long)


class Emu3CfgLogitsProcessor(LogitsProcessor):
    """CFG pairing for the V1 model runner (`vllm.v1.sample.logits_processor.LogitsProcessor`)."""

    @classmethod
    def validate_params(cls, params) -> None:
        validate_cfg_args(params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.ids = token_ids_from_config(vllm_config.model_config.hf_config)
        self.ids.visual_range  # noqa: B018 - fail at engine start, not mid-generation, on an odd vocabulary
        self.rows: dict[int, PairHalf] = {}
        self.failed_pairs: set[str] = set()
        self._pairs: _Pairs | None = None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        process_dict_updates(self.rows, batch_update, lambda params, _prompt, output: pair_half(params, output))
        live = {half.pair for half in self.rows.values()}
        self.failed_pairs &= live  # forget pairs whose requests have all finished
        self._pairs = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self._pairs is None:
            self._pairs = _Pairs(self.rows, self.failed_pairs, logits.device)
        pairs = self._pairs
        if pairs.lone_rows.numel():
            write_one_hot(logits, pairs.lone_rows, torch.full_like(pairs.lone_rows, self.ids.eos))
        if not pairs.pairs:
            return logits
        cond_len = torch.tensor(list(map(len, pairs.cond_outputs)))
        uncond_len = torch.tensor(list(map(len, pairs.uncond_outputs)))
        in_step = (cond_len == uncond_len) & ~pairs.failed
        if not bool(in_step.all()):
            pairs.failed |= ~in_step
            self.failed_pairs.update(p for p, bad in zip(pairs.pairs, (~in_step).tolist()) if bad)
        batch = PairBatch(cond_rows=pairs.cond_rows, uncond_rows=pairs.uncond_rows,
                          position=cond_len.to(logits.device, non_blocking=True),
                          in_step=in_step.to(logits.device, non_blocking=True), h=pairs.h, w=pairs.w,
                          scale=pairs.scale, temperature=pairs.temperature, top_k=pairs.top_k, key=pairs.key)
        guide_pairs(logits, batch, self.ids)
        return logits
