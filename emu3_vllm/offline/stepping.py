"""Stepping an engine the streaming core drives itself: in lockstep with the other data-parallel ranks under
vLLM's external launcher, and aborting a stream's requests when it ends early."""

from __future__ import annotations

import logging

logger = logging.getLogger("emu3_vllm")


class DataParallelLockstep:
    """Stepping an engine that is one data-parallel rank of several under vLLM's `external_launcher` (torchrun).

    There every engine step is a collective across the data-parallel ranks, so each rank must take the same number
    of steps: a rank with nothing to do runs vLLM's dummy batch while another still has work, and all ranks agree
    (one all-reduce per step, as `LLM.generate` does) on when everyone is done.
    """

    def __init__(self, engine, group):
        self.engine = engine
        self.group = group

    @classmethod
    def of(cls, llm) -> DataParallelLockstep | None:
        engine = llm.llm_engine
        if getattr(engine, "external_launcher_dp", False) and getattr(engine, "dp_group", None) is not None:
            return cls(engine, engine.dp_group)
        return None

    def any_rank_busy(self, busy: bool) -> bool:
        """Whether any rank (this one included) still has work; every rank must call this at the same point."""
        from vllm.config import ParallelConfig

        return ParallelConfig.has_unfinished_dp(self.group, busy)

    def step(self, has_requests: bool) -> list:
        """One step in step with the other ranks: a real one when this engine holds requests, else a dummy batch."""
        if has_requests:
            return self.engine.step()
        self.engine.engine_core.execute_dummy_batch()
        return []


def abort(engine, request_ids: list[str]) -> None:
    """Abort requests by the ids `LLM.enqueue` returned. The engine may already be gone (Ctrl-C in a terminal
    reaches its processes too); then there is nothing left to abort."""
    if not request_ids:
        return
    try:
        engine.abort_request(request_ids, internal=True)
    except Exception as exc:  # noqa: BLE001 - cleanup must not replace the exception that got us here
        logger.debug("could not abort %d requests: %s", len(request_ids), exc)
