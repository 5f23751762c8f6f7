"""Pairs stay in lockstep under KV pressure, and a broken lockstep is detected and reported, never emitted."""

from __future__ import annotations

import pytest
from helpers.engines import ENGINE_KWARGS, needs_fp8_kv

pytestmark = pytest.mark.engine

# Very different prompt lengths (the tiny tokenizer is one token per byte).
PROMPTS = [("emu " * n).strip() for n in (1, 5, 40, 2, 80, 3, 20, 60, 7, 1, 33, 4, 90, 12, 2, 50)]


@pytest.fixture(scope="module")
def small_kv_engine(checkpoints):
    """A KV cache of 48 blocks of 32 tokens: room for ~3 pairs at their full length, while 16 are submitted at
    once (vLLM's stats on, to count preemptions)."""
    from emu3_vllm import Emu3

    kwargs = {**ENGINE_KWARGS, "block_size": 32, "num_gpu_blocks_override": 48, "max_num_seqs": 64,
              "disable_log_stats": False}
    engine = Emu3(checkpoints["a"], **kwargs)
    yield engine
    engine.close()


def _preemptions(engine) -> float:
    return sum(m.value for m in engine.llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_sixteen_images_under_kv_pressure_are_well_formed_and_batch_invariant(small_kv_engine):
    engine = small_kv_engine
    seeds = list(range(100, 100 + len(PROMPTS)))
    before = _preemptions(engine)
    batch = engine.generate_images(PROMPTS, height=48, width=48, seed=seeds, use_tqdm=False)
    assert all(r.error is None for r in batch), [r.error for r in batch if r.error]
    # More pairs started than fit at full length, so whole pairs were preempted and resumed on the way.
    assert _preemptions(engine) > before
    assert all(len(r.codes) == 6 and all(len(row) == 6 for row in r.codes) for r in batch)
    for i in (0, 4, 7, 12):  # the same seed alone gives the same image
        alone = engine.generate_images([PROMPTS[i]], height=48, width=48, seed=seeds[i], use_tqdm=False)[0]
        assert alone.codes == batch[i].codes, i


def test_broken_lockstep_is_detected_without_the_pair_scheduler(checkpoints, engine_factory):
    """Stock vLLM scheduling with a small token budget splits the halves' prefills across steps."""
    from emu3_vllm import Emu3

    kwargs = {**ENGINE_KWARGS, "scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler",
              "max_num_batched_tokens": 64, "enable_chunked_prefill": True}
    with Emu3(checkpoints["a"], **kwargs) as stock:
        results = stock.generate_images(PROMPTS[:6], height=32, width=32, seed=7, use_tqdm=False)
    with pytest.raises(RuntimeError, match="this Emu3 engine is closed"):  # a call after close() says so plainly
        stock.generate_images(PROMPTS[:1], height=32, width=32, use_tqdm=False)
    reference = engine_factory("a").generate_images(PROMPTS[:6], height=32, width=32, seed=7, use_tqdm=False)
    failed = [r for r in results if r.error]
    assert failed, "no desync detected although the stock scheduler split the pairs"
    assert all("lockstep" in r.error for r in failed), [r.error for r in failed]
    for ours, ref in zip(results, reference):
        if ours.error is None:  # anything emitted is exactly the correctly paired image
            assert ours.codes == ref.codes


def test_async_pair_scheduler_gives_the_same_images(checkpoints, engine_factory):
    """The async-scheduling variant (vLLM's default mode on GPUs) admits pairs by the same rule; on this CPU
    build the engine runs it synchronously, which is also what it does where vLLM turns async scheduling off."""
    from emu3_vllm import Emu3

    kwargs = {**ENGINE_KWARGS, "scheduler_cls": "emu3_vllm.vllm_plugin.pair_scheduler.PairAwareAsyncScheduler",
              "block_size": 32, "num_gpu_blocks_override": 48}
    with Emu3(checkpoints["a"], **kwargs) as engine:
        results = engine.generate_images(PROMPTS[:8], height=48, width=48, seed=3, use_tqdm=False)
    reference = engine_factory("a").generate_images(PROMPTS[:8], height=48, width=48, seed=3, use_tqdm=False)
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert [r.codes for r in results] == [r.codes for r in reference]


@needs_fp8_kv
def test_fp8_kv_cache_keeps_pairs_whole_under_kv_pressure_and_a_seed_draws_its_image_in_any_crowd(checkpoints):
    """The same KV-starved cache as above, in FP8: whole pairs are preempted and resumed, and each seed gives
    the same image in the crowd as alone (FP8 rounding changes which codes a seed draws against auto, never whether
    a pair stays in lockstep)."""
    from emu3_vllm import Emu3

    kwargs = {**ENGINE_KWARGS, "block_size": 32, "num_gpu_blocks_override": 48, "max_num_seqs": 64,
              "disable_log_stats": False, "kv_cache_dtype": "fp8"}
    seeds = list(range(200, 200 + len(PROMPTS)))
    with Emu3(checkpoints["a"], **kwargs) as engine:
        assert engine.llm.llm_engine.vllm_config.cache_config.cache_dtype == "fp8"
        before = _preemptions(engine)
        crowd = engine.generate_images(PROMPTS, height=48, width=48, seed=seeds, use_tqdm=False)
        assert all(r.error is None for r in crowd), [r.error for r in crowd if r.error]
        assert _preemptions(engine) > before
        for i in (0, 4, 7, 12):
            alone = engine.generate_images([PROMPTS[i]], height=48, width=48, seed=seeds[i], use_tqdm=False)[0]
            assert alone.codes == crowd[i].codes, i
