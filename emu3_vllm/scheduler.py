"""A vLLM scheduler that keeps the two halves of every CFG pair in lockstep.

Stock vLLM gives no such guarantee: requests reach the engine core one by one (a cond half can start a step
before its twin arrives), the token budget can split a pair's prefills across steps, and under KV pressure single
requests are preempted. Before each step this scheduler decides which waiting pairs may start:

- both halves must be waiting (a half whose twin has not arrived waits);
- both prompts must fit this step's token budget whole, and both need a free running slot;
- KV blocks for both halves' full length (prompt + whole image) must be free after reserving the remaining
  growth of every running pair, so a running pair never needs a block that is not there and is never preempted.

Pairs that may not start are held out of the waiting queue for that step, in order (first come, first served).
Requests without CFG tags are scheduled as stock vLLM does.
"""

from __future__ import annotations

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler

from .cfg_processor import cfg_args


class PairAwareScheduler(Scheduler):
    def _full_blocks(self, request) -> int:
        return cdiv(request.num_prompt_tokens + request.max_tokens, self.block_size)

    def _reserved_blocks(self) -> int:
        """Blocks running pairs may still claim before they finish (one spare each for lookahead)."""
        reserved = 0
        for request in self.running:
            if cfg_args(request.sampling_params) is not None:
                reserved += max(0, self._full_blocks(request) - cdiv(request.num_tokens, self.block_size)) + 1
        return reserved

    def _pairs_to_hold(self) -> list:
        waiting = list(self.waiting)
        halves_of: dict[str, list] = {}
        for request in waiting:
            args = cfg_args(request.sampling_params)
            if args is not None:
                halves_of.setdefault(str(args["pair"]), []).append(request)
        if not halves_of:
            return []

        token_budget = self.max_num_scheduled_tokens - len(self.running)
        seq_budget = self.max_num_running_reqs - len(self.running)
        free_blocks = self.kv_cache_manager.block_pool.get_num_free_blocks() - self._reserved_blocks()
        held, decided, admitting = [], set(), True
        for request in waiting:
            args = cfg_args(request.sampling_params)
            if args is None:
                # An untagged request ahead in the queue may take budget before the pairs behind it.
                token_budget -= min(max(token_budget, 0), request.num_tokens - request.num_computed_tokens)
                seq_budget -= 1
                continue
            pair = str(args["pair"])
            if pair in decided:
                continue
            decided.add(pair)
            halves = halves_of[pair]
            if admitting and len(halves) == 2:
                tokens = sum(r.num_tokens - r.num_computed_tokens for r in halves)
                blocks = sum(self._full_blocks(r) for r in halves)
                if tokens <= token_budget and seq_budget >= 2 and blocks <= free_blocks:
                    token_budget -= tokens
                    seq_budget -= 2
                    free_blocks -= blocks
                    continue
                admitting = False  # first come, first served: later pairs wait behind this one
            held.extend(halves)
        return held

    def schedule(self, *args, **kwargs):
        held = self._pairs_to_hold()
        if held:
            self.waiting.remove_requests(held)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            if held:
                self.waiting.prepend_requests(list(reversed(held)))
