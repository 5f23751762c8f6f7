"""Webdataset shards: parquet prompts (a null means "not given"), two `--num-shards` processes covering one job with
every index once and every image the single engine's, and resume shard by shard: finished shards verified and
skipped, an unfinished one redone whole, other settings refused before any engine starts."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers.cli import ENGINE_FLAGS, cli, cli_process, last_json_line
from helpers.outputs import assert_same_image, read_shards

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# 11 prompts: per-row overrides, nulls (the run's setting), and one bad value (item 9's cfg_scale).
ROWS = [{"prompt": f"an emu on a hill, take {i}", "seed": None, "height": None, "width": None, "cfg_scale": None,
         "negative_prompt": None} for i in range(11)]
ROWS[2]["seed"] = 1234
ROWS[4].update(height=48, width=24)
ROWS[6]["negative_prompt"] = "blurry"
ROWS[7]["cfg_scale"] = 5.0
ROWS[9]["cfg_scale"] = -1.0
SEED, SHARD_SIZE = 7, 3  # shards 0-3: [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]


@pytest.fixture(scope="module")
def prompts_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def test_parquet_prompts_read_nulls_as_the_run_settings_and_bad_files_as_usage_errors(prompts_parquet, tmp_path):
    from emu3_vllm.jobs.prompt_source import PromptFileError, read_prompt_file
    from emu3_vllm.offline.items import GenerationDefaults, ItemError, image_spec

    items = read_prompt_file(prompts_parquet)
    assert items[0] == {"prompt": "an emu on a hill, take 0"}
    assert items[2] == {"prompt": "an emu on a hill, take 2", "seed": 1234}
    defaults = GenerationDefaults(height=32, width=32).checked()

    spec = image_spec(items[4], where="item 4", defaults=defaults, seed=SEED + 4)
    assert (spec.height, spec.width, spec.seed) == (48, 24, SEED + 4)
    with pytest.raises(ItemError, match="item 9: cfg_scale must be a finite number > 0"):
        image_spec(items[9], where="item 9", defaults=defaults, seed=SEED + 9)
    null_prompt = tmp_path / "null_prompt.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "fine"}, {"prompt": None}]), null_prompt)
    with pytest.raises(ItemError, match="item 1: prompt must be a string, got None"):
        image_spec(read_prompt_file(null_prompt)[1], where="item 1", defaults=defaults, seed=0)

    for rows, message in (([{"caption": "a cat"}], "no 'prompt' column"),
                          ([{"prompt": "a cat", "cfg-scale": 2.0}], re.escape("unknown columns ['cfg-scale']"))):
        path = tmp_path / "bad.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        with pytest.raises(PromptFileError, match=message):
            read_prompt_file(path)
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("a cat\n")
    with pytest.raises(PromptFileError, match="not a readable parquet file"):
        read_prompt_file(not_parquet)


@pytest.mark.engine
def test_two_shard_processes_cover_one_job_and_resume_shard_by_shard(checkpoints, engine_factory, prompts_parquet,
                                                                     tmp_path):
    from emu3_vllm.jobs.files import ChangedSettingsError, OutputError
    from emu3_vllm.jobs.job import GenerationJob
    from emu3_vllm.jobs.prompt_source import read_prompt_file
    from emu3_vllm.jobs.webdataset import WebdatasetSink
    from emu3_vllm.offline.items import GenerationDefaults

    out = tmp_path / "shards"
    args = ["generate", "--model", checkpoints["a"], "--prompts", prompts_parquet, "--out", out, "--height", 32,
            "--width", 32, "--seed", SEED, "--shard-size", SHARD_SIZE, "--num-shards", 2, "--no-progress",
            *ENGINE_FLAGS]
    procs = [cli_process(*args, "--shard-index", i, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    done = [proc.communicate(timeout=900) for proc in procs]
    # Process 1 has shards 1 and 3, and with shard 3 the bad item 9: exit 1 there, 0 for process 0.
    assert [proc.returncode for proc in procs] == [0, 1], [err[-3000:] for _, err in done]
    assert "item 9: cfg_scale must be a finite number > 0" in done[1][1]
    summaries = [last_json_line(stdout) for stdout, _ in done]
    assert [(s["shards"], s["images"], s["written"], s["failed"]) for s in summaries] == [(2, 6, 6, 0), (2, 5, 4, 1)]

    items = read_shards(out)
    assert sorted(items) == list(range(11))
    assert {i: item["shard"] for i, item in items.items()} == {i: i // SHARD_SIZE for i in range(11)}
    assert [i for i, item in items.items() if item["row"]["error"]] == [9]
    assert "cfg_scale" in items[9]["meta"]["error"]

    # Every image is the one a single engine draws for the same prompt and seed (seed + index unless the row says).
    prompts = read_prompt_file(prompts_parquet)
    good = [i for i in range(11) if i != 9]
    engine = engine_factory("a")
    single = engine.generate_images([prompts[i] for i in good], height=32, width=32, cfg_scale=3.0,
                                    seed=[prompts[i].get("seed", SEED + i) for i in good], use_tqdm=False)
    for index, expected in zip(good, single):
        assert_same_image(items[index]["png"], items[index]["codes"], expected, index)
    assert items[2]["row"]["seed"] == 1234 and (items[4]["row"]["height"], items[4]["row"]["width"]) == (48, 24)

    # Resume: shard 2 lost its done marker and left a temporary file behind, as a kill would leave it.
    (out / "00002_stats.json").unlink()
    (out / ".00002.tar.0123456789ab.tmp").write_bytes(b"partial")
    before = {i: item["row"] for i, item in items.items()}
    defaults = GenerationDefaults(height=32, width=32).checked()

    def shard_job(seed: int = SEED, shard_size: int = SHARD_SIZE) -> GenerationJob:
        return GenerationJob(prompts, WebdatasetSink(out, checkpoints["a"], shard_size=shard_size), defaults, seed)

    job = shard_job()
    assert (job.plan.skipped, job.todo) == ([0, 1, 3], [2])
    stats = job.run(engine, progress=False)
    assert (stats["skipped"], stats["written"], stats["written_shards"]) == (8, 3, 1)
    again = read_shards(out)  # also: no temporary file is left
    assert {i: item["row"] for i, item in again.items()} == before  # the same images, byte for byte

    # A finished shard whose tar changed is redone; other settings and another cut are refused before any engine.
    with open(out / "00001.tar", "ab") as fh:
        fh.write(b"\0")
    job = shard_job()
    assert (job.plan.corrupt, job.todo) == ([1], [1])
    with pytest.raises(ChangedSettingsError, match=r"4 shard\(s\) with images made with other seed: 00000, 00001"):
        shard_job(SEED + 1)
    with pytest.raises(OutputError, match="holds shards of 3 images"):
        shard_job(shard_size=4)
    refused = cli(*args, "--shard-index", 0, "--seed", SEED + 1)  # the CLI says the same, exit 2
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "2 shard(s) with images made with other seed: 00000, 00002" in refused.stderr


@pytest.mark.engine  # runs the CLI
def test_scale_out_options_are_checked_before_any_engine(checkpoints, tmp_path):
    gen = ["generate", "--model", checkpoints["a"], "--out", tmp_path / "o", "--prompt", "x"]
    proc = cli(*gen, "--format", "folder", "--replicas", 2)
    assert proc.returncode == 2 and "--replicas writes webdataset shards" in proc.stderr, proc.stderr
    proc = cli(*gen, "--num-shards", 2)
    assert proc.returncode == 2 and "give --num-shards and --shard-index together" in proc.stderr, proc.stderr
    proc = cli(*gen, "--num-shards", 2, "--shard-index", 2)
    assert proc.returncode == 2 and "--shard-index must be in [0, 2)" in proc.stderr, proc.stderr
