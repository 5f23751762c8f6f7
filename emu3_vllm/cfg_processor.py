"""CFG for Emu3 image generation inside vLLM's sampler (V1 model-runner logits-processor interface).

Each image is two requests tagged through `SamplingParams.extra_args["emu3_cfg"]`: the conditional half and its
unconditional twin. Every step the processor finds both rows of each pair, checks they are in lockstep (both
present, same number of generated tokens), computes the guided distribution with `cfg.cfg_step`, and writes the
chosen token as a one-hot row into both rows, so vLLM's own sampler must emit it for both halves.

A pair out of lockstep is a bug upstream (scheduling): the processor ends both halves at once with EOS where the
layout does not allow it, and the caller reports that image as failed instead of emitting a wrong image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .cfg import cfg_step, one_hot_rows
from .layout import ImageTokenIds, Slot, slot

EXTRA_ARGS_KEY = "emu3_cfg"
COND, UNCOND = "cond", "uncond"


@dataclass
class PairHalf:
    pair: str
    role: str
    scale: float
    h: int
    w: int
    seed: int
    temperature: float
    top_k: int
    output_ids: list[int]  # vLLM's live list of this request's generated tokens


def cfg_args(params) -> dict | None:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(EXTRA_ARGS_KEY)


def _token_ids_from_config(hf_config) -> ImageTokenIds:
    vocab = hf_config.vocabulary_map
    text = hf_config.text_config
    name_of = {v: k for k, v in vocab.items()}
    eos = text.eos_token_id[0] if isinstance(text.eos_token_id, (list, tuple)) else text.eos_token_id
    pad = name_of.get(text.pad_token_id)
    return ImageTokenIds.from_vocabulary(vocab, eos_token=name_of[eos], pad_token=pad)


class Emu3CfgLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, params) -> None:
        args = cfg_args(params)
        if args is None:
            return
        missing = {"pair", "role", "scale", "h", "w", "seed"} - set(args)
        if missing:
            raise ValueError(f"{EXTRA_ARGS_KEY} lacks {sorted(missing)}")
        if args["role"] not in (COND, UNCOND):
            raise ValueError(f"{EXTRA_ARGS_KEY}.role must be 'cond' or 'uncond', got {args['role']!r}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.ids = _token_ids_from_config(vllm_config.model_config.hf_config)
        self.device = device
        self.rows: dict[int, PairHalf] = {}
        self.failed_pairs: set[str] = set()
        self._masks: dict[Slot, torch.Tensor] = {}  # allowed-token mask per slot kind, built once

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params, _prompt_ids, output_ids):
            args = cfg_args(params)
            if args is None:
                return None
            return PairHalf(pair=str(args["pair"]), role=args["role"], scale=float(args["scale"]), h=int(args["h"]),
                            w=int(args["w"]), seed=int(args["seed"]), temperature=float(args.get("temperature", 1.0)),
                            top_k=int(args.get("top_k", 0)), output_ids=output_ids)

        process_dict_updates(self.rows, batch_update, new_state)

    def _allowed(self, k: int, h: int, w: int, vocab_size: int) -> torch.Tensor:
        s = slot(k, h, w)
        if s is Slot.DONE:
            s = Slot.EOS  # a pair past its end is only ever ended
        mask = self._masks.get(s)
        if mask is None or mask.shape[0] != vocab_size:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            allowed = self.ids.visual if s is Slot.VISUAL else (self.ids.slot_token(s),)
            mask[torch.tensor(allowed, device=self.device)] = True
            self._masks[s] = mask
        return mask

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        halves: dict[str, dict[str, int]] = {}
        for index, half in self.rows.items():
            halves.setdefault(half.pair, {})[half.role] = index

        self.failed_pairs &= halves.keys()  # forget pairs whose requests have all finished
        vocab_size = logits.shape[1]
        cond_rows, uncond_rows, pairs = [], [], []
        broken: list[int] = []
        for pair, roles in halves.items():
            c, u = roles.get(COND), roles.get(UNCOND)
            in_step = (c is not None and u is not None
                       and len(self.rows[c].output_ids) == len(self.rows[u].output_ids))
            if pair in self.failed_pairs or not in_step:
                self.failed_pairs.add(pair)
                broken.extend(i for i in (c, u) if i is not None)
                continue
            cond_rows.append(c)
            uncond_rows.append(u)
            pairs.append(self.rows[c])

        if pairs:
            positions = [len(p.output_ids) for p in pairs]
            allowed = torch.stack([self._allowed(k, p.h, p.w, vocab_size) for k, p in zip(positions, pairs)])
            tokens = cfg_step(
                logits[cond_rows], logits[uncond_rows], allowed,
                scale=torch.tensor([p.scale for p in pairs], device=logits.device),
                temperature=torch.tensor([p.temperature for p in pairs]),
                top_k=torch.tensor([p.top_k for p in pairs]),
                seeds=[p.seed for p in pairs], positions=positions,
            )
            rows = one_hot_rows(tokens, vocab_size, logits.dtype, logits.device)
            logits[cond_rows] = rows
            logits[uncond_rows] = rows
        if broken:
            eos = torch.full((len(broken),), self.ids.eos, dtype=torch.long)
            logits[broken] = one_hot_rows(eos, vocab_size, logits.dtype, logits.device)
        return logits
