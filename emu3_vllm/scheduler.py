"""A vLLM scheduler that keeps the two halves of every CFG pair in lockstep.

Stock vLLM gives no such guarantee: requests reach the engine core one by one (a cond half can start a step
before its twin arrives), the token budget can split a pair's prefills across steps, and under KV pressure single
requests are preempted. Before each step this scheduler decides how much of the head of the waiting queue may
start:

- a pair starts only with both halves next to each other in the queue (a half whose twin has not arrived waits);
- both prompts must fit this step's token budget whole, and both need a free running slot;
- KV blocks for both halves' full length (prompt + whole image) must be free after reserving the remaining
  growth of every running pair, so a running pair never needs a block that is not there and is never preempted.

The first pair that may not start ends the admitted head (first come, first served). Stock vLLM then schedules
with only that head in view: the rest of the queue is set aside untouched, so a step costs O(admitted requests),
not O(queue), however many thousands of images wait. Requests without CFG tags are scheduled as stock vLLM does.
"""

from __future__ import annotations

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler

from .protocol import pair_id_of


def _pair_id(request) -> str | None:
    return pair_id_of(request.sampling_params)


class _PairAdmission:
    """The admission rule above, mixed into vLLM's synchronous or asynchronous scheduler."""

    def _full_blocks(self, request) -> int:
        return cdiv(request.num_prompt_tokens + request.max_tokens, self.block_size)

    def _reserved_blocks(self) -> int:
        """Blocks running pairs may still claim before they finish (one spare each for lookahead)."""
        reserved = 0
        for request in self.running:
            if _pair_id(request) is not None:
                reserved += max(0, self._full_blocks(request) - cdiv(request.num_tokens, self.block_size)) + 1
        return reserved

    def _admitted_head(self, may_reorder: bool = True) -> int | None:
        """How many requests at the head of the waiting queue may be scheduled; None: all of them."""
        token_budget = self.max_num_scheduled_tokens - len(self.running)
        seq_budget = self.max_num_running_reqs - len(self.running)
        free_blocks = None  # computed once a pair is a candidate
        head = 0
        queue = iter(self.waiting)
        for request in queue:
            pair = _pair_id(request)
            if pair is None:
                # Untagged requests ahead of the pairs take their budget as stock vLLM would give it.
                token_budget -= min(max(token_budget, 0), request.num_tokens - request.num_computed_tokens)
                seq_budget -= 1
                head += 1
                continue
            if seq_budget < 2:
                return head
            twin = next(queue, None)
            if twin is None or _pair_id(twin) != pair:
                if may_reorder and twin is not None and self._pull_twin_forward(request, pair):
                    return self._admitted_head(may_reorder=False)  # the queue changed: scan again
                return head
            halves = (request, twin)
            tokens = sum(r.num_tokens - r.num_computed_tokens for r in halves)
            if free_blocks is None:
                free_blocks = self.kv_cache_manager.block_pool.get_num_free_blocks() - self._reserved_blocks()
            blocks = sum(self._full_blocks(r) for r in halves)
            if tokens > token_budget or blocks > free_blocks:
                return head
            token_budget -= tokens
            seq_budget -= 2
            free_blocks -= blocks
            head += 2
        return None

    def _pull_twin_forward(self, half, pair: str) -> bool:
        """Rare: something was queued between the halves of a pair. Move the twin right behind its half."""
        twin = next((r for r in self.waiting if r is not half and _pair_id(r) == pair), None)
        if twin is None:
            return False  # not arrived yet: the pair waits
        ordered = []
        for request in self.waiting:
            if request is twin:
                continue
            ordered.append(request)
            if request is half:
                ordered.append(twin)
        self.waiting.remove_requests(ordered)
        for request in ordered:
            self.waiting.add_request(request)
        return True

    def schedule(self, *args, **kwargs):
        head = self._admitted_head() if self.waiting else None
        if head is None:
            return super().schedule(*args, **kwargs)
        full_queue, shown = self.waiting, create_request_queue(self.policy)
        for _ in range(head):
            shown.add_request(full_queue.pop_request())
        self.waiting = shown
        try:
            return super().schedule(*args, **kwargs)
        finally:
            # Whatever the step left waiting (not scheduled, or preempted) goes back ahead of the set-aside tail.
            self.waiting = full_queue
            full_queue.prepend_requests(list(reversed(list(shown))))


class PairAwareScheduler(_PairAdmission, Scheduler):
    """For engines without async scheduling (vLLM's CPU build, or `async_scheduling=False`)."""


class PairAwareAsyncScheduler(_PairAdmission, AsyncScheduler):
    """For engines with async scheduling (vLLM's default on GPUs): scheduling overlaps the model step."""
