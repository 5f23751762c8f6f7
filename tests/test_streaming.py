"""The streaming core: a bounded window of images in the engine, every index once, results as pairs finish; and
`emu3-vllm generate` writing each image the moment it is done, surviving SIGKILL and Ctrl-C, and resuming to
byte-identical PNGs."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers.cli import ENGINE_FLAGS, cli, cli_process, counts
from helpers.kill_when import signal_at
from helpers.outputs import assert_manifest_names_complete_files, read_manifest

pytestmark = pytest.mark.engine


def test_iter_images_over_a_generator_of_200_prompts_keeps_the_window(engine_factory):
    from emu3_vllm.offline.image_stream import StreamStats

    engine = engine_factory("a")
    unfinished = engine.llm.llm_engine.get_num_unfinished_requests
    pulled = []

    def prompts():
        for i in range(200):
            pulled.append(i)
            yield f"a small emu number {i}"

    stats = StreamStats()
    seen, most_in_engine, most_ahead = [], 0, 0
    for index, result in engine.iter_images(prompts(), height=8, width=16, seed=0, max_in_flight=6, decode_batch=4,
                                            stats=stats):
        assert result.error is None, result.error
        assert result.image.size == (16, 8) and result.seed == index
        seen.append(index)
        most_in_engine = max(most_in_engine, unfinished())
        most_ahead = max(most_ahead, len(pulled) - len(seen))
    assert sorted(seen) == list(range(200))
    assert most_in_engine <= 2 * 6  # both halves of at most 6 images
    assert stats.max_in_engine == 6
    # Prompts are read as the window frees up, never materialised: at most the engine's 6 and fewer than 2 decode
    # batches of 4 waiting for the decoder or the consumer.
    assert most_ahead < 6 + 2 * 4
    assert unfinished() == 0
    assert stats.finished == 200 and stats.engine_steps > 0


def test_generate_images_is_the_stream_collected_in_order(engine_factory):
    engine = engine_factory("a")
    prompts = ["a red emu", "a blue emu", "", "a green emu"]
    collected = engine.generate_images(prompts, height=16, width=16, seed=3, use_tqdm=False)
    streamed = dict(engine.iter_images(prompts, height=16, width=16, seed=3, max_in_flight=1))
    assert sorted(streamed) == [0, 1, 2, 3]
    assert [r.codes for r in collected] == [streamed[i].codes for i in range(4)]
    assert "item 2: prompt is empty" in collected[2].error


def test_stopping_a_stream_early_aborts_what_it_had_in_the_engine(engine_factory):
    engine = engine_factory("a")
    stream = engine.iter_images([f"emu {i}" for i in range(12)], height=16, width=16, seed=1, max_in_flight=4)
    next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        engine.understand("Describe a cat.", max_new_tokens=2, use_tqdm=False)
    stream.close()
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    again = engine.generate_images(["emu 0"], height=16, width=16, seed=1, use_tqdm=False)[0]
    assert again.error is None


def _job_ends(proc, within: float) -> bool:
    """Whether every process of the job's group has ended (zombies awaiting their reaper count as ended)."""
    import psutil

    def alive() -> bool:
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive():
            return True
        time.sleep(0.5)
    return False


def _kill_job(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_cli_writes_images_as_they_finish_survives_sigkill_and_ctrl_c_and_resumes(checkpoints, engine_factory,
                                                                                  tmp_path):
    from emu3_vllm.jobs.files import png_bytes

    n, side = 24, 128
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"an emu on a hill, take {i}\n" for i in range(n)))
    # --max-num-seqs 2: one pair at a time, so the images finish one after another (128x128: 275 tokens each, about
    # a second apiece here). The kills come early (after 3 images, then 2 more), leaving most of the run as slack
    # for a watcher that a busy machine wakes late.
    args = ["generate", "--model", checkpoints["a"], "--prompts", prompts, "--height", side, "--width", side,
            "--seed", 7, "--max-num-seqs", 2, "--no-progress", *ENGINE_FLAGS]
    # What an uninterrupted run writes: image i drawn with seed 7 + i (the shared engine's images are the CLI's
    # pixel for pixel), encoded as the CLI encodes it.
    reference = engine_factory("a").generate_images(prompts.read_text().splitlines(), height=side, width=side,
                                                    seed=7, use_tqdm=False)

    # SIGKILL mid-way (the CLI process alone, as an OOM killer would): what the manifest names is whole, and images
    # appeared one after another.
    out = tmp_path / "out"
    proc = cli_process(*args, "--out", out)
    killer = signal_at(out, proc, 3, signal.SIGKILL)
    try:
        proc.wait(timeout=600)
        assert killer.wait(timeout=60) == 0, "the run ended before it could be killed"
    finally:
        _kill_job(proc)
    engine_gone = _job_ends(proc, within=60)
    _kill_job(proc)
    assert engine_gone, "the engine processes outlived the SIGKILLed CLI"
    # Written one by one as they finished, not all at once at the end: the run was killed once 3 were there, and
    # not all of them were.
    killed_at = len([r for r in read_manifest(out) if "file" in r])
    assert 3 <= killed_at < n
    assert_manifest_names_complete_files(out)

    # Ctrl-C (SIGINT to the job's process group, as a terminal sends it): exit 130, folder consistent.
    proc = cli_process(*args, "--out", out)
    interrupter = signal_at(out, proc, killed_at + 2, signal.SIGINT, group=True)
    try:
        code = proc.wait(timeout=600)
        assert interrupter.wait(timeout=60) == 0, "the run ended before Ctrl-C"
        assert code == 130
    finally:
        _kill_job(proc)
    interrupted_at = len({r["index"] for r in read_manifest(out) if "file" in r})
    assert killed_at < interrupted_at <= n
    assert_manifest_names_complete_files(out)

    resumed = cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stats = counts(resumed.stdout)
    assert stats["skipped"] == interrupted_at and stats["written"] == n - interrupted_at
    records = assert_manifest_names_complete_files(out)
    assert sorted({r["index"] for r in records}) == list(range(n))
    for i, image in enumerate(reference):
        assert (out / f"{i:05d}.png").read_bytes() == png_bytes(image.image), i
