"""Data-parallel generation on a local Ray cluster: two replicas (half a CPU each) on the tiny checkpoint write 26
images in 12 shards; the driver is SIGKILLed mid-run and a re-run finishes the job. Every index is there exactly
once, and every image is the one a single engine draws with the same seed, whichever replica drew it."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers.cli import ENGINE_FLAGS, cli_process
from helpers.engines import ENGINE_KWARGS
from helpers.outputs import assert_same_image, read_shards

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.engine

# 12 shards of 4 images of 64x64: after the first shard is written (when the driver is killed) the replicas have
# seconds of work left, more than Ray takes to end a dead driver's actors, however fast the machine.
N, SHARD_SIZE, SEED, SIDE = 46, 4, 7, 64
SHARDS = -(-N // SHARD_SIZE)  # the last one holds 2 images
PROMPTS = [f"a small emu on a hill, take {i}" for i in range(N)]
PROMPTS[13] = ""  # an empty prompt: item 13 fails (in shard 1), naming itself, and the job goes on


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _wait(condition, timeout: float, what: str):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout} s")


def test_replicas_write_every_index_once_and_a_rerun_after_sigkill_finishes(checkpoints, engine_factory,
                                                                           ray_cluster, tmp_path):
    from emu3_vllm import generate_on_ray

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "shards"
    # --max-num-seqs 2: one image at a time per replica, so the driver is killed while shards are still open.
    args = ["generate", "--model", checkpoints["a"], "--prompts", prompts, "--out", out, "--height", SIDE,
            "--width", SIDE, "--seed", SEED, "--shard-size", SHARD_SIZE, "--replicas", 2, "--cpus-per-replica", 0.5,
            "--ray-address", ray_cluster, "--max-num-seqs", 2, "--no-progress", *ENGINE_FLAGS]
    with open(tmp_path / "driver.log", "w") as log:
        # What a user joining this cluster has: its authentication settings (ray.init set them here).
        ray_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
        driver = cli_process(*args, env=ray_env, stdout=log, stderr=log)
        try:
            _wait(lambda: list(out.glob("*_stats.json")) or driver.poll() is not None, 900, "finished shard")
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    # Ray ends a dead driver's replicas: wait until their CPUs are free again; the shards they finished until then
    # are the ones a re-run keeps.
    _wait(lambda: ray.available_resources().get("CPU", 0) >= 4, 120, "released replicas")
    finished = {path.name: path.read_bytes() for path in out.glob("*_stats.json")}
    assert 0 < len(finished) < SHARDS, sorted(finished)

    summary = generate_on_ray(checkpoints["a"], PROMPTS, out, replicas=2, cpus_per_replica=0.5,
                              shard_size=SHARD_SIZE, seed=SEED, height=SIDE, width=SIDE, cfg_scale=3.0, progress=False,
                              **ENGINE_KWARGS)
    assert summary["skipped_shards"] == len(finished) and summary["written_shards"] == SHARDS - len(finished), summary
    redone = [s for s in range(SHARDS) if f"{s:05d}_stats.json" not in finished]
    assert summary["written"] + summary["failed"] == sum(len(range(s * SHARD_SIZE, min(N, (s + 1) * SHARD_SIZE)))
                                                         for s in redone)
    assert summary["replicas"] and all(r["images_per_s"] > 0 for r in summary["replicas"] if r["images"]), summary
    for name, data in finished.items():  # the shards finished before the kill were kept as they were
        assert (out / name).read_bytes() == data, name

    items = read_shards(out)  # each shard as its stats describe it, every index once, no temporary file left
    assert sorted(items) == list(range(N))
    assert [i for i, item in items.items() if item["row"]["error"]] == [13]
    assert "item 13: prompt is empty" in items[13]["row"]["error"]
    good = [i for i in range(N) if i != 13]
    single = engine_factory("a").generate_images([PROMPTS[i] for i in good], height=SIDE, width=SIDE, cfg_scale=3.0,
                                                 seed=[SEED + i for i in good], use_tqdm=False)
    for index, expected in zip(good, single):
        assert_same_image(items[index]["png"], items[index]["codes"], expected, index)
