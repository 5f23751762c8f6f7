"""A vLLM scheduler that keeps the two halves of every CFG pair in lockstep.

Stock vLLM gives no such guarantee: requests reach the engine core one by one (a cond half can start a step
before its twin arrives), the token budget can split a pair's prefills across steps, and under KV pressure single
requests are preempted. This scheduler treats the pair as the unit of admission and of preemption. Before each
step:

- Running pairs that need KV blocks this step get them: if the free blocks fall short, the newest running pairs
  are preempted whole, both halves back to the head of the queue, to be recomputed together later. Sampling is
  keyed by (seed, position), so a resumed image is the image it would have been. Stock vLLM is thus never left
  to preempt a single half.
- A pair starts only with both halves next to each other in the queue (a half whose twin has not arrived waits),
  both prompts whole within this step's token budget, and both with a free running slot.
- KV blocks: a pair whose prompt and image are small next to the token budget (so it can always be resumed in
  one step) starts when the blocks it needs now are free, as stock vLLM admits a request; the cache then holds as
  many images as fit at their current length, not at their final one. A larger pair starts only when blocks for
  its full length (prompt + whole image) are free on top of the remaining growth of such pairs already running,
  and is never preempted.

The first pair that may not start ends the admitted head (first come, first served). Stock vLLM then schedules
with only that head in view: the rest of the queue is set aside untouched, so a step costs O(admitted and
running requests), not O(queue), however many thousands of images wait. Requests without CFG tags are scheduled
as stock vLLM does.
"""

from __future__ import annotations

import time

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler

from emu3_vllm.cfg_pairs import pair_id_of


def _pair_id(request) -> str | None:
    return pair_id_of(request.sampling_params)


class _PairAdmission:
    """The admission and preemption rules above, mixed into vLLM's synchronous or asynchronous scheduler."""

    def _full_blocks(self, request) -> int:
        return cdiv(request.num_prompt_tokens + request.max_tokens, self.block_size)

    def _preemptible(self, request) -> bool:
        """Whether the pair of `request` may start on its current need and be preempted: its halves, at full
        length, fit half the token budget, so once preempted they come back as one prefill step."""
        return 2 * (request.num_prompt_tokens + request.max_tokens) <= self.max_num_scheduled_tokens // 2

    def _step_blocks(self, request) -> int:
        """KV blocks a running request claims for its next token (1 when that token starts a new block)."""
        held = request.num_computed_tokens + self.num_lookahead_tokens
        return int(held % self.block_size == 0)

    def _running_need(self) -> int:
        """Blocks the running requests must be able to claim: this step's new blocks, plus the remaining growth
        of running pairs that may not be preempted (one spare each for lookahead)."""
        need = 0
        for request in self.running:
            if _pair_id(request) is not None and not self._preemptible(request):
                need += max(0, self._full_blocks(request) - cdiv(request.num_tokens, self.block_size)) + 1
            else:
                need += self._step_blocks(request)
        return need

    def _preempt_newest_pairs(self) -> tuple[bool, int]:
        """Preempt whole pairs, newest first, until the running requests' need fits the free blocks. Returns
        whether any pair was preempted, and the free blocks left over the need."""
        pool = self.kv_cache_manager.block_pool
        spare = pool.get_num_free_blocks() - self._running_need()
        preempted = False
        while spare < 0:
            victim = self._newest_preemptible_pair()
            if victim is None:
                break  # only pairs whose growth was reserved when they started: their blocks are there
            for request in victim:  # the later half first, so both land at the queue's head in their order
                self.running.remove(request)
                self._preempt_request(request, time.monotonic())
            preempted = True
            spare = pool.get_num_free_blocks() - self._running_need()
        return preempted, spare

    def _newest_preemptible_pair(self) -> tuple | None:
        """Both halves of the newest running pair that may be preempted (later half first); never the last pair
        running, which the cache always holds whole."""
        by_pair: dict[str, list] = {}
        for request in self.running:
            pair = _pair_id(request)
            if pair is not None:
                by_pair.setdefault(pair, []).append(request)
        if len(by_pair) < 2:
            return None
        for pair in reversed(list(by_pair)):
            halves = by_pair[pair]
            if len(halves) == 2 and self._preemptible(halves[0]):
                return halves[1], halves[0]
        return None

    def _admitted_head(self, free_blocks: int, may_reorder: bool = True) -> int | None:
        """How many requests at the head of the waiting queue may be scheduled; None: all of them."""
        token_budget = self.max_num_scheduled_tokens - len(self.running)
        seq_budget = self.max_num_running_reqs - len(self.running)
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
                    return self._admitted_head(free_blocks, may_reorder=False)  # the queue changed: scan again
                return head
            halves = (request, twin)
            tokens = sum(r.num_tokens - r.num_computed_tokens for r in halves)
            if self._preemptible(request):
                blocks = sum(cdiv(r.num_tokens + self.num_lookahead_tokens, self.block_size) for r in halves)
            else:
                blocks = sum(self._full_blocks(r) + 1 for r in halves)
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
        preempted, spare = self._preempt_newest_pairs()
        # After a preemption nothing new starts: the cache is full, and the preempted pairs wait at the head.
        head = (0 if preempted else self._admitted_head(spare)) if self.waiting else None
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
