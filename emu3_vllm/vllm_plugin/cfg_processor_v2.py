"""CFG pairing for vLLM's Model Runner V2 (`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`).

The same step as the V1 adapter (`cfg_step.guide_pairs`), fed from V2's state: requests live in recycled slots
(`add_request` overwrites whatever a slot held; V2 never says when a request ends), each step's rows map to
slots through `ctx.idx_mapping_np`, and a half's generated length is `total_len - prompt_len` on the device. Pair
matching is numpy over the step's slots and the lockstep check and failure flags stay on the device, so a step
needs no host sync and no per-row Python.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from emu3_vllm.cfg_pairs import COND, pair_half, validate_cfg_args
from emu3_vllm.vllm_plugin.cfg_processor_v1 import token_ids_from_config
from emu3_vllm.vllm_plugin.cfg_step import PairBatch, guide_pairs, write_one_hot

_UNTAGGED, _COND, _UNCOND = 0, 1, 2


class Emu3CfgLogitsProcessorV2(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_cfg_args(sampling_params)

    def __init__(self, vllm_config, req_states):
        if vllm_config.speculative_config is not None:
            raise ValueError("emu3_vllm's CFG image generation does not support speculative decoding")
        self.ids = token_ids_from_config(vllm_config.model_config.hf_config)
        self.ids.visual_range  # noqa: B018 - fail at engine start on an odd vocabulary
        self.req_states = req_states
        n = req_states.max_num_reqs
        self.role = np.zeros(n, dtype=np.int8)
        self.twin = np.full(n, -1, dtype=np.int64)
        self.pair_of_slot: list[str | None] = [None] * n
        self.first_half: dict[str, int] = {}  # pair -> slot of the half that arrived first
        self.host = {"h": np.zeros(n, np.int64), "w": np.zeros(n, np.int64), "top_k": np.zeros(n, np.int64),
                     "key": np.zeros(n, np.int64), "scale": np.zeros(n, np.float32),
                     "temperature": np.zeros(n, np.float32)}
        device = req_states.device
        self.dev = {name: torch.from_numpy(a).to(device) for name, a in self.host.items()}
        self.failed = torch.zeros(n, dtype=torch.bool, device=device)
        self._staged: list[int] = []

    def _clear(self, slot: int) -> None:
        twin = int(self.twin[slot])
        if twin >= 0 and self.twin[twin] == slot:
            self.twin[twin] = -1
        self.twin[slot] = -1
        pair = self.pair_of_slot[slot]
        if pair is not None and self.first_half.get(pair) == slot:
            del self.first_half[pair]
        self.pair_of_slot[slot] = None
        self.role[slot] = _UNTAGGED

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self._clear(req_idx)
        half = pair_half(sampling_params)
        if half is None:
            return False
        role = _COND if half.role == COND else _UNCOND
        self.role[req_idx] = role
        self.pair_of_slot[req_idx] = half.pair
        for name in self.host:
            self.host[name][req_idx] = getattr(half, name)
        other = self.first_half.pop(half.pair, None)
        if other is not None and self.role[other] not in (_UNTAGGED, role):
            self.twin[req_idx], self.twin[other] = other, req_idx
        else:
            self.first_half[half.pair] = req_idx
        self._staged.append(req_idx)
        return True

    def apply_staged_writes(self) -> None:
        if not self._staged:
            return
        slots = torch.tensor(self._staged, dtype=torch.long)
        for name, values in self.host.items():
            self.dev[name][slots.to(self.dev[name].device)] = torch.from_numpy(values[self._staged]).to(
                self.dev[name].device)
        self.failed[slots.to(self.failed.device)] = False
        self._staged = []

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slots = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        role = self.role[slots]
        tagged = role != _UNTAGGED
        if not tagged.any():
            return logits
        if logits.shape[0] != slots.shape[0]:
            raise RuntimeError("emu3_vllm's CFG processor expects one logits row per request (no speculative decoding)")
        row_of_slot = np.full(self.role.shape[0], -1, dtype=np.int64)
        row_of_slot[slots] = np.arange(slots.shape[0])
        twin_slot = self.twin[slots]
        twin_row = np.where(twin_slot >= 0, row_of_slot[np.maximum(twin_slot, 0)], -1)
        device = logits.device

        def dev(a):
            return torch.from_numpy(a).to(device, non_blocking=True)

        lone = np.nonzero(tagged & (twin_row < 0))[0]
        if lone.size:  # a half without its twin in the step can never be guided: end it
            lone_rows = dev(lone)
            write_one_hot(logits, lone_rows, torch.full_like(lone_rows, self.ids.eos))
            self.failed[dev(slots[lone])] = True
        cond = np.nonzero((role == _COND) & (twin_row >= 0))[0]
        if not cond.size:
            return logits
        cond_rows, uncond_rows = dev(cond), dev(twin_row[cond])
        c_slots, u_slots = dev(slots[cond]), dev(twin_slot[cond])
        total, prompt = self.req_states.total_len.gpu, self.req_states.prompt_len.gpu
        position = (total[c_slots] - prompt[c_slots]).long()
        in_step = (position == (total[u_slots] - prompt[u_slots]).long()) & ~self.failed[c_slots] \
            & ~self.failed[u_slots]
        self.failed[c_slots] = ~in_step
        self.failed[u_slots] = ~in_step
        d = self.dev
        batch = PairBatch(cond_rows=cond_rows, uncond_rows=uncond_rows, position=position, in_step=in_step,
                          h=d["h"][c_slots], w=d["w"][c_slots], scale=d["scale"][c_slots],
                          temperature=d["temperature"][c_slots], top_k=d["top_k"][c_slots], key=d["key"][c_slots])
        guide_pairs(logits, batch, self.ids)
        return logits
