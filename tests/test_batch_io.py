"""A crash mid-run loses no finished image; re-running the same job resumes where it stopped."""

from __future__ import annotations

import json

import pytest

from emu3_vllm.batch_io import MANIFEST, generate_to_dir, read_prompts

PROMPTS = ["a red emu", "a blue emu", "", "a green emu", "a tiny emu"]


class Crash(Exception):
    pass


def test_crash_then_resume(engine_factory, tmp_path):
    engine = engine_factory("a")
    out = tmp_path / "run"
    kwargs = dict(height=32, width=32, batch=2, seed=40, use_tqdm=False)

    def crash_after_first_chunk(chunk):
        raise Crash(chunk)

    with pytest.raises(Crash):
        generate_to_dir(engine, PROMPTS, out, on_chunk_done=crash_after_first_chunk, **kwargs)
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert (out / "00000.png").is_file() and (out / "00001.png").is_file()
    first = (out / "00000.png").read_bytes()

    stats = generate_to_dir(engine, PROMPTS, out, **kwargs)
    assert stats == {"skipped": 2, "written": 2, "failed": 1}  # item 2 is an empty prompt
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    assert "prompt is empty" in next(r for r in records if r["index"] == 2)["error"]
    assert (out / "00000.png").read_bytes() == first  # untouched by the resumed run

    # Same seeds per index: a fresh run makes byte-identical images.
    fresh = generate_to_dir(engine, PROMPTS, tmp_path / "fresh", **kwargs)
    assert fresh["written"] == 4
    for i in (0, 1, 3, 4):
        assert (tmp_path / "fresh" / f"{i:05d}.png").read_bytes() == (out / f"{i:05d}.png").read_bytes()


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\n")
    assert read_prompts(str(txt)) == ["a cat", "a dog"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat", "seed": 3}) + "\n")
    assert read_prompts(str(jl)) == [{"prompt": "a cat", "seed": 3}]
    assert read_prompts("just a prompt") == ["just a prompt"]
