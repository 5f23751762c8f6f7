"""The output writers as users meet them: a manifest a crash cut mid-line is whole again after the next run, a write
that fails (a full disk, a file-size limit) ends the run with its summary and one error line and leaves nothing
half-written, shards hold every seed the settings allow, a folder keeps one output format, and a null prompt is
recorded as null.

Write failures are real: the writer runs in a child process under `RLIMIT_FSIZE` with SIGXFSZ ignored, so its
writes past the limit fail with EFBIG as they would with ENOSPC on a full disk. Only the last test starts an engine;
the others draw with `Drawer`, which stands in for `Emu3.iter_images` (the writers never look past its results).
"""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import ENGINE_FLAGS, cli, last_json_line
from helpers.env import subprocess_env
from helpers.outputs import assert_manifest_names_complete_files, read_manifest, read_shards

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TESTS = Path(__file__).resolve().parent
MODEL = "BAAI/Emu3-Gen-hf"  # a hub id: the writers record it as given and never load it
SEED = 5
INT64_MIN, INT64_MAX, INT32_MAX = -(2**63), 2**63 - 1, 2**31 - 1
# Drawn images are noise, so their PNGs are about as large as their pixels: 16x16 ~ 850 bytes, 48x48 ~ 7 KB.
BIG = {"height": 48, "width": 48}


def _defaults(**overrides):
    from emu3_vllm.offline.items import GenerationDefaults

    return GenerationDefaults(**{"height": 16, "width": 16, **overrides}).checked()


class Drawer:
    """Stands in for an `Emu3` engine's `iter_images`: each spec's image is noise drawn from its seed, yielded in
    order, with its code grid."""

    def iter_images(self, specs, *, indices, max_in_flight=None, stats=None):
        from PIL import Image

        from emu3_vllm.offline.results import GeneratedImage

        for spec, index in zip(specs, indices):  # a spec first: the job's feed names its index as it hands it out
            rng = np.random.default_rng(spec.seed % 2**64)
            result = GeneratedImage.of(spec)
            result.image = Image.fromarray(rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8))
            result.codes = rng.integers(0, 1000, (spec.h, spec.w)).tolist()
            yield index, result


def _job(fmt: str, out: Path, prompts: list, shard_size: int = 2, **defaults):
    from emu3_vllm.jobs.image_folder import ImageFolderSink
    from emu3_vllm.jobs.job import GenerationJob
    from emu3_vllm.jobs.webdataset import WebdatasetSink

    sink = ImageFolderSink(out, MODEL) if fmt == "folder" else WebdatasetSink(out, MODEL, shard_size=shard_size)
    return GenerationJob(prompts, sink, _defaults(**defaults), SEED)


def _child_main(fmt: str, out: str, prompts: str) -> None:
    """Runs in the limited child process: one job, then what it said, as JSON on stdout."""
    job = _job(fmt, Path(out), json.loads(prompts))
    try:
        job.run(Drawer(), progress=False)
        print(json.dumps({"stats": job.stats}))
    except OSError as exc:
        print(json.dumps({"raised": type(exc).__name__, "error": str(exc), "errno": exc.errno,
                          "filename": exc.filename, "stats": job.stats}))


def _file_size_limit(limit: int):
    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from the write, not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


def _run_limited(fmt: str, out: Path, prompts: list, limit: int) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_output_writers as writers; "
            "writers._child_main(*sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, fmt, str(out), json.dumps(prompts)], check=False,
                          capture_output=True, text=True, env=subprocess_env(), preexec_fn=_file_size_limit(limit),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _cli(*args, limit: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return cli(*args, timeout=timeout, preexec_fn=_file_size_limit(limit) if limit else None)


def _leftovers(out: Path) -> list[str]:
    """Temporary files a writer left: `.00002.png.tmp<pid>`, `.00000.tar.<token>.tmp`, ..."""
    return sorted(path.name for path in out.iterdir() if path.name.startswith(".") and ".tmp" in path.name)


def _null_prompts_parquet(path: Path, rows: int) -> Path:
    pq.write_table(pa.table({"prompt": pa.array([None] * rows, pa.string())}), path)
    return path


# --------------------------------------------------------------------------------------------------------------
# 1. A manifest cut mid-line


@pytest.mark.parametrize("cut", [9, 1], ids=["mid-record", "just-the-newline"])
def test_a_manifest_cut_mid_line_is_whole_again_after_the_next_run(tmp_path, cut):
    out = tmp_path / "out"
    prompts = ["a red emu", "a caf\u00e9 at night \u2713", "a blue emu"]
    _job("folder", out, prompts).run(Drawer(), progress=False)
    png = (out / "00002.png").read_bytes()
    path = out / "manifest.jsonl"
    path.write_bytes(path.read_bytes()[:-cut])  # a crash during the last append

    job = _job("folder", out, [*prompts, "a green emu"])
    stats = job.run(Drawer(), progress=False)

    records = read_manifest(out, whole=True)  # no two records glued into one line
    whole = cut == 1  # the record only lost its newline: it is kept, and its image skipped
    assert (stats["skipped"], stats["written"]) == ((3, 1) if whole else (2, 2))
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert sorted(r["index"] for r in assert_manifest_names_complete_files(out)) == [0, 1, 2, 3]
    assert (out / "00002.png").read_bytes() == png


# --------------------------------------------------------------------------------------------------------------
# 2. A write that fails


@pytest.mark.parametrize(("limit", "fails"), [(3000, "00002.png"), (1300, "manifest.jsonl")])
def test_a_failed_folder_write_stops_the_run_leaving_no_partial_file_and_a_resume_completes(tmp_path, limit, fails):
    out = tmp_path / "out"
    # Item 2's PNG (~7 KB) is past a 3000-byte limit; at 1300 bytes the third manifest line (~550 bytes each) is.
    prompts = ["a", "b", {"prompt": "c", **BIG} if fails.endswith(".png") else "c", "d"]
    said = _run_limited("folder", out, prompts, limit)

    assert _leftovers(out) == []
    assert (said["raised"], said["error"]) == ("WriteError", f"cannot write {out / fails}: File too large"), said
    assert (said["errno"], said["filename"], said["stats"]["written"]) == (errno.EFBIG, str(out / fails), 2)
    assert [r["index"] for r in read_manifest(out, whole=True)] == [0, 1]  # a failed append is cut back whole
    before = {i: (out / f"{i:05d}.png").read_bytes() for i in (0, 1)}

    stats = _job("folder", out, prompts).run(Drawer(), progress=False)
    assert (stats["skipped"], stats["written"], stats["failed"]) == (2, 2, 0)
    assert sorted(r["index"] for r in assert_manifest_names_complete_files(out)) == [0, 1, 2, 3]
    assert len(read_manifest(out, whole=True)) == 4
    assert all((out / f"{i:05d}.png").read_bytes() == png for i, png in before.items())


def test_a_failed_shard_write_removes_the_shards_temporary_files_and_a_resume_completes(tmp_path):
    out = tmp_path / "shards"
    # Each tar is padded to 10 KiB: shard 0 (two small images) fits a 12000-byte limit, shard 1 (one 48x48) does not.
    prompts = ["a", "b", {"prompt": "c", **BIG}, "d"]
    said = _run_limited("webdataset", out, prompts, 12000)

    assert sorted(path.name for path in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert (said["raised"], said["error"]) == ("WriteError", f"cannot write {out / '00001.tar'}: File too large")
    assert said["stats"]["written_shards"] == 1
    assert sorted(read_shards(out)) == [0, 1]  # the finished shard is whole, and no temporary file is left

    job = _job("webdataset", out, prompts)
    assert (job.plan.skipped, job.todo) == ([0], [1])
    stats = job.run(Drawer(), progress=False)
    assert (stats["skipped"], stats["written"], stats["written_shards"]) == (2, 2, 1)
    assert sorted(read_shards(out)) == [0, 1, 2, 3]


@pytest.mark.engine  # runs the CLI
@pytest.mark.parametrize(("fmt", "limit", "fails"), [("folder", 200, "manifest.jsonl"),
                                                     ("webdataset", 4096, "00000.tar")])
def test_a_failed_write_ends_generate_with_its_summary_and_one_error_line(checkpoints, tmp_path, fmt, limit, fails):
    # Null prompts need no engine, yet each is written: a manifest line (~90 bytes) or a tar member.
    prompts = _null_prompts_parquet(tmp_path / "prompts.parquet", 4)
    out = tmp_path / "out"
    args = ["generate", "--model", checkpoints["a"], "--prompts", prompts, "--out", out, "--format", fmt,
            "--no-progress"]
    if fmt == "webdataset":
        args += ["--shard-size", 2]

    proc = _cli(*args, limit=limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert len(proc.stdout.splitlines()) == 1 and summary["images"] == 4
    assert summary["error"] == f"cannot write {out / fails}: File too large"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    unit = "image" if fmt == "folder" else "shard"
    expected = (f"emu3-vllm generate: error: cannot write {out / fails}: File too large; every finished {unit} is in "
                "the folder, and a re-run continues from there")
    assert errors == [expected]
    assert _leftovers(out) == []

    again = _cli(*args)  # the disk has room again
    assert again.returncode == 1, again.stderr[-3000:]  # every item has a null prompt: each one fails, on record
    assert last_json_line(again.stdout)["failed"] == 4 - last_json_line(again.stdout)["skipped"]
    if fmt == "folder":
        assert [r["index"] for r in read_manifest(out, whole=True)][-4:] == [0, 1, 2, 3]
    else:
        assert sorted(read_shards(out)) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------------
# 3. Every value the settings allow


def test_shards_hold_the_extreme_seeds_and_top_k_the_settings_allow(tmp_path):
    from emu3_vllm.jobs.webdataset import ROW_COLUMNS, item_of_row, item_row

    out = tmp_path / "shards"
    prompts = [{"prompt": "the largest seed", "seed": INT64_MAX}, {"prompt": "the smallest seed", "seed": INT64_MIN},
               {"prompt": "a negative seed", "seed": -1}]
    job = _job("webdataset", out, prompts, shard_size=3, top_k=INT32_MAX)
    stats = job.run(Drawer(), progress=False)
    assert (stats["written"], stats["failed"]) == (3, 0)

    items = read_shards(out)
    assert [items[i]["row"]["seed"] for i in range(3)] == [INT64_MAX, INT64_MIN, -1]
    assert [items[i]["meta"]["seed"] for i in range(3)] == [INT64_MAX, INT64_MIN, -1]
    assert {items[i]["row"]["top_k"] for i in range(3)} == {INT32_MAX}
    # A re-run recognises its own shard; and the rows a Ray replica receives hold the same values.
    assert _job("webdataset", out, prompts, shard_size=3, top_k=INT32_MAX).plan.skipped == [0]
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in ROW_COLUMNS])
    shard_items = list(job.items())
    rows = pa.Table.from_pylist([item_row(item, 0, 3) for item in shard_items], schema=schema).to_pylist()
    assert [item_of_row(row) for row in rows] == shard_items


# --------------------------------------------------------------------------------------------------------------
# 4. One output format per folder, and options that would be ignored


def _refused(proc, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]
    assert proc.stdout == ""


@pytest.mark.engine  # runs the CLI
def test_a_folder_holds_one_output_format_and_options_it_would_ignore_are_refused(checkpoints, tmp_path):
    shards, folder = tmp_path / "shards", tmp_path / "folder"
    _job("webdataset", shards, ["a"], shard_size=1).run(Drawer(), progress=False)
    _job("folder", folder, ["a"]).run(Drawer(), progress=False)
    listing = {out: sorted(path.name for path in out.iterdir()) for out in (shards, folder)}
    # A good prompt: any of these runs would start an engine if it got that far.
    gen = ["generate", "--model", checkpoints["a"], "--prompt", "a red emu", "--height", 16, "--width", 16]

    _refused(_cli(*gen, "--out", shards), f"--out {shards} holds webdataset shards (00000.parquet)")
    _refused(_cli(*gen, "--out", shards, "--format", "folder"), "holds webdataset shards")
    _refused(_cli(*gen, "--out", folder, "--format", "webdataset"), f"--out {folder} holds a folder of PNGs "
                                                                   "(manifest.jsonl)")
    _refused(_cli(*gen, "--out", tmp_path / "new", "--shard-size", 10), "--shard-size cuts webdataset shards")
    _refused(_cli(*gen, "--out", tmp_path / "new", "--format", "folder", "--shard-size", 10), "--shard-size")
    _refused(_cli(*gen, "--out", tmp_path / "new", "--cpus-per-replica", 0.5),
             "--cpus-per-replica sizes Ray replicas; give it with --replicas or --ray-address")
    assert {out: sorted(path.name for path in out.iterdir()) for out in (shards, folder)} == listing
    assert not (tmp_path / "new").exists()

    # Given with shards it is used; not given, the default applies (null prompts: no engine needed).
    prompts = _null_prompts_parquet(tmp_path / "prompts.parquet", 3)
    base = ["generate", "--model", checkpoints["a"], "--prompts", prompts, "--format", "webdataset"]
    for out, flags, size in ((tmp_path / "given", ["--shard-size", 2], 2), (tmp_path / "default", [], 1000)):
        proc = _cli(*base, "--out", out, *flags)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert json.loads((out / "00000_stats.json").read_text())["shard_size"] == size


# --------------------------------------------------------------------------------------------------------------
# 5. A null prompt


def test_a_null_prompt_row_is_recorded_as_null_in_both_formats(tmp_path):
    from emu3_vllm.jobs.prompt_source import read_prompt_file

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "fine"}, {"prompt": None}]), path)
    # Other bad prompts as JSON lines give them: a null line, a number, no prompt, text no UTF-8 file can hold.
    lines = ['null', '{"prompt": 123}', '{"seed": 3}', '{"prompt": "broken \\udcff surrogate"}']
    prompts = [*read_prompt_file(path), *map(json.loads, lines)]
    bad = range(1, len(prompts))

    _job("folder", tmp_path / "folder", prompts).run(Drawer(), progress=False)
    records = {r["index"]: r for r in read_manifest(tmp_path / "folder", whole=True)}
    assert records[0]["prompt"] == "fine" and "error" not in records[0]
    assert [records[i]["prompt"] for i in bad] == [None, None, 123, None, "broken \udcff surrogate"]
    assert all("prompt" in records[i]["error"] for i in bad)

    _job("webdataset", tmp_path / "shards", prompts, shard_size=6).run(Drawer(), progress=False)
    items = read_shards(tmp_path / "shards")
    expected = ["fine", None, None, "123", None, "broken \\udcff surrogate"]  # a string column holds only text
    assert [items[i]["row"]["prompt"] for i in range(6)] == expected
    assert [items[i]["meta"]["prompt"] for i in range(6)] == expected
    assert all("prompt" in items[i]["row"]["error"] for i in bad)


# --------------------------------------------------------------------------------------------------------------
# With an engine: a disk that fills up during a real run


_FILLS_UP_AFTER_THE_ENGINE_STARTS = (
    # The engine's processes need shared memory, which RLIMIT_FSIZE limits too: the CLI's own process gets the limit
    # once its engine is up, so only the output files meet it.
    "import resource, runpy, signal, sys\n"
    "import emu3_vllm.offline.emu3 as api\n"
    "limit, start = int(sys.argv.pop(1)), api.Emu3.__init__\n"
    "def started(self, *args, **kwargs):\n"
    "    start(self, *args, **kwargs)\n"
    "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))\n"
    "api.Emu3.__init__ = started\n"
    "sys.argv[0] = 'emu3-vllm'\n"
    "runpy.run_module('emu3_vllm.cli', run_name='__main__')\n")


@pytest.mark.engine
def test_generate_on_a_full_disk_stops_cleanly_and_the_rerun_finishes(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = ["a red emu", "a blue emu", {"prompt": "a large emu", **BIG}, "a green emu"]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = ["generate", "--model", checkpoints["a"], "--prompts", prompts, "--out", out, "--height", 16, "--width", 16,
            "--seed", SEED, "--max-in-flight", 1, "--no-progress", *ENGINE_FLAGS]

    # One image at a time, in order: images 0 and 1 (~700 bytes each) fit a 3000-byte limit, image 2's PNG does not.
    full = subprocess.run([sys.executable, "-c", _FILLS_UP_AFTER_THE_ENGINE_STARTS, "3000", *map(str, args)],
                          check=False, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    summary = last_json_line(full.stdout)
    assert (summary["images"], summary["written"], summary["failed"]) == (4, 2, 0), summary
    assert f"emu3-vllm generate: error: cannot write {out / '00002.png'}: File too large" in full.stderr
    assert _leftovers(out) == [] and not (out / "00002.png").exists()
    before = {r["index"]: r for r in assert_manifest_names_complete_files(out)}
    assert sorted(before) == [0, 1]
    path = out / "manifest.jsonl"
    path.write_bytes(path.read_bytes()[:-20])  # and then a crash cut the last line short

    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = last_json_line(again.stdout)
    assert (summary["skipped"], summary["written"], summary["failed"]) == (1, 3, 0), summary
    assert len(read_manifest(out, whole=True)) == 4
    after = {r["index"]: r for r in assert_manifest_names_complete_files(out)}
    assert sorted(after) == [0, 1, 2, 3]
    assert [after[i]["sha256"] for i in (0, 1)] == [before[i]["sha256"] for i in (0, 1)]  # seeds make them again
    assert read_manifest(out) == read_manifest(out, whole=True)
