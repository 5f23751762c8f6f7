"""`emu3-vllm` as a user runs it: bad arguments and files stop it before any engine starts (exit 2, one line),
results and logs stay apart, errors name the image index, and resume verifies what it skips."""

from __future__ import annotations

import json

import pytest
from helpers.cli import ENGINE_FLAGS, cli, counts
from helpers.outputs import assert_manifest_names_complete_files, read_manifest

pytestmark = pytest.mark.engine


def _one_line_error(proc, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_files")
    bad_json = root / "bad.jsonl"
    bad_json.write_text('{"prompt": "fine"}\n{"prompt": "no closing brace"\n')
    latin1 = root / "latin1.txt"
    latin1.write_bytes("a caf\u00e9 at night\n".encode("latin-1"))
    good = root / "good.txt"
    good.write_text("a red emu\n")
    return {"bad_json": bad_json, "latin1": latin1, "good": good, "root": root}


def test_input_errors_exit_2_before_any_engine(checkpoints, prompt_files, tmp_path):
    model = checkpoints["a"]
    gen = ["generate", "--model", model, "--out", tmp_path / "o"]
    _one_line_error(cli(*gen, "--prompts", "my_promtps.txt"), "my_promtps.txt: no such prompts file")
    _one_line_error(cli(*gen, "--prompts", prompt_files["bad_json"]), "bad.jsonl:2: not a JSON value")
    _one_line_error(cli(*gen, "--prompts", prompt_files["latin1"]), "latin1.txt:1: not UTF-8 text")
    _one_line_error(cli("generate", "--model", tmp_path / "no-such-model", "--out", tmp_path / "o", "--prompt", "x"),
                    "no-such-model: no such checkpoint folder")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _one_line_error(cli("generate", "--model", model, "--out", a_file, "--prompt", "x"), "exists and is not a folder")
    _one_line_error(cli("generate", "--model", model, "--out", "/proc/1/emu3-images", "--prompt", "x"),
                    "cannot write there")
    _one_line_error(cli("understand", "--model", model, "--prompts-file", tmp_path / "missing.jsonl"),
                    "missing.jsonl: no such prompts file")
    _one_line_error(cli("understand", "--model", model, "--prompt", "x", "--image", tmp_path / "nope.png"),
                    "nope.png: no such file")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    for bad in ("0", "-3"):
        proc = cli(*gen, "--prompt", "x", "--batch", bad)
        assert proc.returncode == 2 and "expected a positive integer" in proc.stderr, proc.stderr
    proc = cli(*gen, "--prompt", "x", "--cfg-scale", "nan")
    assert proc.returncode == 2 and "--cfg-scale" in proc.stderr
    proc = cli(*gen)  # neither --prompt nor --prompts
    assert proc.returncode == 2 and "--prompt" in proc.stderr
    # Engine settings that would kill the engine process once it started are refused before it starts.
    for args, fragment in ((("understand", "--model", model, "--prompt", "x", "--seed", "-1"),
                            "--seed: must be >= 0, got -1"),
                           ((*gen, "--prompt", "x", "--seed", str(2**63)), "--seed: must be <= 9223372036854775807"),
                           ((*gen, "--prompt", "x", "--top-k", str(2**63)), "--top-k: must be <= 2147483647"),
                           ((*gen, "--prompt", "x", "--height", "8", "--width", "8"), "a single 8x8 token"),
                           ((*gen, "--prompt", "x", "--dtype", "fp64"), "--dtype: invalid choice"),
                           ((*gen, "--prompt", "x", "--engine-arg", "num_gpu_blocks_override=many"),
                            "--engine-arg num_gpu_blocks_override: Input should be a valid integer"),
                           ((*gen, "--prompt", "x", "--engine-arg", "no_such_option=1"),
                            "no_such_option: not a vLLM engine argument"),
                           ((*gen, "--prompt", "x", "--kv-cache-dtype", "fp9"), "kv_cache_dtype: Input should be")):
        proc = cli(*args)
        assert proc.returncode == 2 and fragment in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and fragment in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_understand_prints_clean_json_lines_for_every_item_form(checkpoints, tmp_path):
    from helpers.engines import random_image

    image = tmp_path / "img.png"
    random_image(40, 40, seed=3).save(image)
    lines = [{"text": "Describe the picture.", "images": [str(image)]},
             ["list item question", []],
             {"prompt": "prompt key question"},
             "plain string question",
             {"text": "a missing image", "images": [str(tmp_path / "missing.png")]},
             ["list with an image", [str(image)]]]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = cli("understand", "--model", checkpoints["a"], "--prompts-file", path, "--max-new-tokens", 4,
               *ENGINE_FLAGS)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one item failed
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is nothing but JSON lines
    assert [r["index"] for r in records] == list(range(len(lines)))
    assert [r["question"] for r in records] == ["Describe the picture.", "list item question", "prompt key question",
                                                "plain string question", "a missing image", "list with an image"]
    assert records[5]["images"] == [str(image)]
    assert "item 4, image 0: cannot decode image" in records[4]["error"]
    assert all("error" not in r for i, r in enumerate(records) if i != 4)
    assert "1 of 6 items failed" in proc.stderr


def test_generate_names_image_indices_verifies_files_and_never_mixes_settings(checkpoints, tmp_path):
    model = checkpoints["a"]
    prompts = tmp_path / "prompts.jsonl"
    rows = ["a", {"prompt": "second", "seed": None}, "c", "d", "e", {"prompt": "f", "cfg_scale": "abc"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["generate", "--model", model, "--prompts", prompts, "--out", out, "--height", 32, "--width", 32,
            "--seed", 3, "--max-in-flight", 2, *ENGINE_FLAGS]

    first = cli(*args)
    assert first.returncode == 1, first.stderr[-3000:]
    assert counts(first.stdout) == {"out": str(out), "images": 6, "skipped": 0, "written": 4, "failed": 2,
                                            "regenerated": 0}
    assert len(first.stdout.splitlines()) == 1
    records = {r["index"]: r for r in assert_manifest_names_complete_files(out)}
    assert records[1]["error"] == "item 1: seed must be an integer, got None"
    assert records[5]["error"] == "item 5: cfg_scale must be a finite number, got 'abc'"
    assert {r["seed"] for i, r in records.items() if i in (0, 2, 3, 4)} == {3, 5, 6, 7}
    for i in (0, 2, 3, 4):
        assert records[i]["model"] and records[i]["prompt"] == rows[i] and records[i]["height"] == 32
        assert records[i]["negative_prompt"] and records[i]["top_k"] == 2048 and records[i]["temperature"] == 1.0
    original = (out / "00000.png").read_bytes()

    # A truncated PNG is not trusted (it is made again, byte for byte, below).
    with open(out / "00000.png", "r+b") as fh:
        fh.truncate(100)

    # Other settings for the same folder: refused before any engine starts, saying what differs and where.
    other = cli(*args[:-len(ENGINE_FLAGS)], "--height", 16, "--width", 16, "--seed", 100, *ENGINE_FLAGS)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr[-2000:]
    assert "4 image(s) made with other height, seed, width: 0, 2, 3, 4" in other.stderr
    rows[2] = "c, but different"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = cli(*args)
    assert changed.returncode == 2 and "1 image(s) made with other prompt: 2" in changed.stderr

    replaced = cli(*args, "--regenerate-changed")
    assert replaced.returncode == 1, replaced.stderr[-3000:]
    assert counts(replaced.stdout) == {"out": str(out), "images": 6, "skipped": 2, "written": 2, "failed": 2,
                                       "regenerated": 2}
    assert "regenerating 1 image(s) whose file no longer matches" in replaced.stderr
    assert (out / "00000.png").read_bytes() == original
    latest = {r["index"]: r for r in read_manifest(out)}
    assert latest[2]["prompt"] == "c, but different"
    assert_manifest_names_complete_files(out)
