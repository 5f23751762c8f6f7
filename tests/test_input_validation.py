"""Every input is checked where it enters: a bad item fails alone with an error naming it (and its field), the
others go on, and the engine is left as it was for the next call. Through the Python API, as a user calls it."""

from __future__ import annotations

import json

import pytest
from helpers.outputs import read_manifest
from PIL import Image


@pytest.mark.engine
def test_a_wrong_typed_override_fails_its_item_and_leaves_the_engine_clean(engine_factory):
    engine = engine_factory("a")
    results = engine.generate_images(["good one", {"prompt": "x", "seed": "abc"}, "good two"], height=16, width=16,
                                     use_tqdm=False, seed=4)
    assert results[0].ok and results[2].ok
    assert results[1].error == "item 1: seed must be an integer, got 'abc'"
    results = engine.generate_images(["good one", {"prompt": "x", "negative_prompt": None}], height=16, width=16,
                                     seed=4, use_tqdm=False)
    assert results[0].ok and "item 1: negative_prompt must be a string, got None" == results[1].error
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    assert len(engine.generate_images(["next call"], height=16, width=16, use_tqdm=False)) == 1


@pytest.mark.engine
def test_an_exception_while_enqueueing_aborts_what_the_call_enqueued(engine_factory):
    engine = engine_factory("a")

    def prompts():
        yield from ["one", "two", "three"]
        raise OSError("the prompt source broke")

    with pytest.raises(OSError, match="prompt source broke"):
        engine.generate_images(prompts(), height=16, width=16, use_tqdm=False)
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    answers = engine.understand(["Describe a cat."], max_new_tokens=2, use_tqdm=False)
    assert answers[0].ok and len(answers) == 1


@pytest.mark.engine
def test_a_plain_string_is_one_item(engine_factory):
    engine = engine_factory("a")
    assert len(engine.generate_images("a cat", height=16, width=16, use_tqdm=False)) == 1
    assert len(engine.understand("Describe a cat", max_new_tokens=2, use_tqdm=False)) == 1
    assert len(engine.understand({"text": "Describe a cat"}, max_new_tokens=2, use_tqdm=False)) == 1


@pytest.mark.engine
def test_tiny_and_thin_images_are_answered_and_the_aspect_limit_is_named(engine_factory):
    engine = engine_factory("a")
    items = [("What is this?", [Image.new("RGB", (1, 1), "red")]),
             ("What is this?", [Image.new("RGB", (40, 3), "blue")]),
             ("What is this?", [Image.new("RGB", (300, 1), "green")])]
    answers = engine.understand(items, max_new_tokens=2, use_tqdm=False)
    assert answers[0].ok and answers[1].ok, [a.error for a in answers]
    assert answers[2].error == ("item 2, image 0: image is 300x1, an aspect ratio of 300; Emu3's image processor "
                                "takes at most 200")


@pytest.mark.engine
def test_seeds_and_sizes_follow_one_rule(engine_factory):
    engine = engine_factory("a")
    results = engine.generate_images([{"prompt": "a", "seed": 1.7}, {"prompt": "b", "seed": 2.0},
                                      {"prompt": "c", "height": 20, "width": 28}, {"prompt": "d", "height": 3}],
                                     height=16, width=16, use_tqdm=False)
    assert results[0].error == "item 0: seed must be an integer, got 1.7"
    assert results[1].ok and results[1].seed == 2
    assert (results[2].height, results[2].width) == (24, 32)  # nearest multiple of 8, halves up
    assert results[2].image.size == (32, 24)
    assert "item 3: height 3 is below one 8-pixel token" in results[3].error


@pytest.mark.engine
def test_call_level_arguments_are_checked_before_anything_runs(engine_factory):
    engine = engine_factory("a")
    with pytest.raises(ValueError, match="cfg_scale must be a finite number > 0, got 0.0"):
        engine.generate_images(["x"], cfg_scale=0.0, use_tqdm=False)
    with pytest.raises(ValueError, match="height must be an integer"):
        engine.generate_images(["x"], height="64", use_tqdm=False)
    with pytest.raises(TypeError, match="seed must be None, an int or a list"):
        engine.generate_images(["x"], seed="7", use_tqdm=False)
    with pytest.raises(ValueError, match="seeds"):
        engine.generate_images(["x", "y"], seed=[1], height=16, width=16, use_tqdm=False)
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0


def _fuzz_lines() -> list[tuple[str, str | None]]:
    """(JSON line, the field its error must name, or None for a good line)."""
    good = lambda i: json.dumps({"prompt": f"a good emu {i}"})  # noqa: E731
    cases = [
        (good(0), None),
        (json.dumps("a plain string prompt"), None),
        (json.dumps({"prompt": 123}), "prompt"),
        (json.dumps({"prompt": ["a", "b"]}), "prompt"),
        (json.dumps({"prompt": None}), "prompt"),
        (json.dumps(None), "prompt"),
        (json.dumps(42), "prompt"),
        (json.dumps(["a", "list"]), "prompt"),
        (json.dumps({}), "prompt"),
        (json.dumps({"prompt": ""}), "prompt"),
        (json.dumps({"prompt": "   "}), "prompt"),
        (json.dumps(""), "prompt"),
        (good(1), None),
        (json.dumps({"prompt": "x", "seed": None}), "seed"),
        (json.dumps({"prompt": "x", "seed": "abc"}), "seed"),
        (json.dumps({"prompt": "x", "seed": 1.5}), "seed"),
        (json.dumps({"prompt": "x", "seed": True}), "seed"),
        (json.dumps({"prompt": "x", "height": None}), "height"),
        (json.dumps({"prompt": "x", "height": "16"}), "height"),
        (json.dumps({"prompt": "x", "height": 0}), "height"),
        (json.dumps({"prompt": "x", "width": -8}), "width"),
        (json.dumps({"prompt": "x", "width": 16.5}), "width"),
        (json.dumps({"prompt": "x", "height": 2}), "height"),
        (json.dumps({"prompt": "x", "height": 4096, "width": 4096}), "max_model_len"),
        (good(2), None),
        (json.dumps({"prompt": "x", "cfg_scale": 0}), "cfg_scale"),
        (json.dumps({"prompt": "x", "cfg_scale": -1}), "cfg_scale"),
        ('{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
        ('{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale"),
        (json.dumps({"prompt": "x", "cfg_scale": "3"}), "cfg_scale"),
        (json.dumps({"prompt": "x", "cfg_scale": None}), "cfg_scale"),
        (json.dumps({"prompt": "x", "negative_prompt": None}), "negative_prompt"),
        (json.dumps({"prompt": "x", "negative_prompt": 5}), "negative_prompt"),
        (json.dumps({"prompt": "x", "colour": "red"}), "colour"),
        (json.dumps({"text": "x"}), "text"),
        (good(3), None),
        (json.dumps({"prompt": "emu " * 1500}), "prompt"),  # 6000 tokens: beyond max_model_len 1024
        ('{"prompt": "broken \\udcff surrogate"}', "prompt"),  # not encodable as UTF-8
        ('{"prompt": "x", "negative_prompt": "\\ud800"}', "negative_prompt"),
        (json.dumps({"prompt": "a prompt with a \u0000 NUL and ünïcödé ✓"}), None),
        (json.dumps({"prompt": "x", "height": 16, "width": 24, "seed": 9, "cfg_scale": 2.5}), None),
        (good(4), None),
        (json.dumps({"prompt": {"nested": "object"}}), "prompt"),
        (json.dumps({"prompt": "x", "seed": [1]}), "seed"),
        (json.dumps({"prompt": "x", "height": 16, "width": None}), "width"),
        (good(5), None),
        (json.dumps({"prompt": "x", "cfg_scale": -0.0}), "cfg_scale"),
        (json.dumps({"prompt": "x", "seed": -3}), None),
        (good(6), None),
        (json.dumps({"prompt": "final emu", "negative_prompt": ""}), None),
    ]
    return cases


@pytest.mark.engine
def test_fuzzed_prompts_file_each_good_line_draws_each_bad_line_fails_alone(engine_factory, tmp_path):
    from emu3_vllm.jobs.image_folder import ImageFolderSink
    from emu3_vllm.jobs.job import GenerationJob
    from emu3_vllm.jobs.prompt_source import read_prompt_file
    from emu3_vllm.offline.items import GenerationDefaults

    engine = engine_factory("a")
    cases = _fuzz_lines()
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(line for line, _ in cases) + "\n")
    prompts = read_prompt_file(path)
    assert len(prompts) == len(cases) >= 50
    job = GenerationJob(prompts, ImageFolderSink(tmp_path / "out", engine.model),
                        GenerationDefaults(height=16, width=16).checked(), seed=100)
    stats = job.run(engine, progress=False)
    records = {r["index"]: r for r in read_manifest(tmp_path / "out")}
    assert sorted(records) == list(range(len(cases)))
    for index, (line, field) in enumerate(cases):
        record = records[index]
        if field is None:
            assert "file" in record and record.get("error") is None, (line, record)
            assert (tmp_path / "out" / record["file"]).is_file()
        else:
            assert record.get("error", "").startswith(f"item {index}:"), (line, record)
            assert field in record["error"], (line, record["error"])
            assert "file" not in record
    good = sum(field is None for _, field in cases)
    assert stats["written"] == good and stats["failed"] == len(cases) - good
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    assert engine.generate_images(["the next call"], height=16, width=16, use_tqdm=False)[0].ok


def test_lmms_eval_model_args_are_checked_by_name_before_an_engine_starts():
    pytest.importorskip("lmms_eval")
    from emu3_vllm.lmms.adapters import Emu3VLLM

    with pytest.raises(ValueError, match="emu3_vllm model_arg cfg_scale: expected a number, got 'abc'"):
        Emu3VLLM(pretrained="/no/such/checkpoint", cfg_scale="abc")
    with pytest.raises(ValueError, match="model_arg image_height: expected an integer, got 720.5"):
        Emu3VLLM(pretrained="/no/such/checkpoint", image_height=720.5)
    with pytest.raises(ValueError, match="model_arg fail_gracefully: expected true or false, got 'maybe'"):
        Emu3VLLM(pretrained="/no/such/checkpoint", fail_gracefully="maybe")


@pytest.mark.engine
def test_values_past_what_the_engine_holds_fail_their_item_and_the_engine_lives(engine_factory, checkpoints):
    """top_k >= 2**63 used to kill the engine from inside the CFG step; an int64-overflowing seed broke the shard
    writer; an 8x8 image failed in VQ decode after its tokens were drawn. Each is now refused where it enters."""
    from emu3_vllm import Emu3

    engine = engine_factory("a")
    results = engine.generate_images(["good", {"prompt": "x", "seed": 2**63}, {"prompt": "y", "seed": 2**64 + 5},
                                      {"prompt": "z", "height": 8, "width": 8}, {"prompt": "w", "seed": 1e20}],
                                     height=16, width=16, seed=3, use_tqdm=False)
    assert results[0].ok
    assert results[1].error == "item 1: seed must be <= 9223372036854775807, got 9223372036854775808"
    assert results[2].error.startswith("item 2: seed must be <= 9223372036854775807")
    assert "item 3: size 8x8 is a single 8x8 token" in results[3].error
    assert results[4].error == "item 4: seed must be <= 9223372036854775807, got 1e+20"
    with pytest.raises(ValueError, match="top_k must be <= 2147483647, got 9223372036854775808"):
        engine.generate_images(["x"], top_k=2**63, height=16, width=16, use_tqdm=False)
    with pytest.raises(ValueError, match="indices: 5 appears more than once"):
        list(engine.iter_images(["a", "b", "c"], indices=[5, 5, -2], height=16, width=16))
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        Emu3(checkpoints["a"], seed=-1)  # refused before an engine starts (vLLM's worker would die of it)
    smallest = engine.generate_images([{"prompt": "x", "height": 8, "width": 16}], seed=1, use_tqdm=False)[0]
    assert smallest.ok and smallest.image.size == (16, 8)
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    assert engine.generate_images(["the next call"], height=16, width=16, seed=3, use_tqdm=False)[0].ok


@pytest.mark.engine
def test_a_second_thread_is_told_the_engine_is_busy_and_the_first_call_finishes(engine_factory):
    import threading

    engine = engine_factory("a")
    stream = engine.iter_images(["one", "two", "three"], height=16, width=16, seed=0)
    first = next(stream)
    errors = []

    def other_thread():
        try:
            engine.generate_images(["from another thread"], height=16, width=16, use_tqdm=False)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert errors and "another thread" in errors[0] and "one call at a time" in errors[0], errors
    rest = list(stream)
    assert sorted([first[0]] + [i for i, _ in rest]) == [0, 1, 2] and all(r.ok for _, r in [first, *rest])
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
