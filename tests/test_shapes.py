"""The trained shapes checkpoint, judged by meaning: what it answers about pictures of the shapes world and what it
draws for the world's captions, each on samples drawn fresh from the world with the test's own seed.

A bug that transformers would share (a transposed grid, swapped colour channels, guidance pushing the wrong way, a
wrong negative-prompt convention) passes the parity tests on random weights; here it costs accuracy. (lmms-eval on
a shapes VQA task runs in tests/test_lmms_eval.py, with the other understanding task in one lmms-eval run.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from emu3_vllm import shapes
from emu3_vllm.shapes.trained import shapes_checkpoint

UNDERSTANDING_SEED = 1001
VQ_SEED = 1002
GENERATION_SEEDS = (7000, 8000)  # caption i of the 18 is drawn with seeds 7000 + i and 8000 + i
VCOT_SEED = 9000
SIZE = 64


def _ask(engine, images, question):
    return engine.understand([(question, [image]) for image in images], max_new_tokens=24, use_tqdm=False)


def _draw(engine, captions, cfg_scale, seeds, **kwargs):
    results = engine.generate_images(captions, height=SIZE, width=SIZE, cfg_scale=cfg_scale, seed=list(seeds),
                                     use_tqdm=False, **kwargs)
    for result in results:
        assert result.error is None, result.error
        assert result.image.size == (SIZE, SIZE)
    return results


def _codes_of(engine, token_rows):
    """(h, w) code grids from the visual-token ids (with end-of-line columns) the engine's VQ encoder gave."""
    code_of = {token: code for code, token in enumerate(engine.token_ids.visual)}
    grids = []
    for ids in token_rows:
        rows = np.asarray(ids).reshape(SIZE // 8, SIZE // 8 + 1)
        assert (rows[:, -1] == engine.token_ids.eol).all()
        grids.append([[code_of[int(t)] for t in row[:-1]] for row in rows])
    return grids


# ----------------------------------------------------------------------------------------------------------------
# The world and the checkpoint as files (no engine)


def test_world_follows_its_drawing_rules_and_the_classifier_reads_it_back():
    fresh = shapes.samples(300, seed=4)
    for sample in fresh:
        assert shapes.MIN_SIDE <= sample.side <= shapes.MAX_SIDE
        assert 0 <= sample.x0 and sample.x0 + sample.side < shapes.IMAGE_SIZE
        assert 0 <= sample.y0 and sample.y0 + sample.side < shapes.IMAGE_SIZE
        assert shapes.classify(sample.image()) == (sample.colour, sample.shape)
    square = shapes.ShapeSample("square", "blue", 30, 5, 7)
    pixels = np.asarray(square.image())
    inside = (pixels == shapes.PALETTE["blue"]).all(-1)
    assert inside.sum() == 31 * 31 and inside[7:38, 5:36].all()  # PIL's box is inclusive
    assert ((pixels == 255).all(-1) | inside).all()  # no outline, no antialiasing: two colours only
    assert shapes.samples(5, seed=3) == shapes.samples(5, seed=3)
    assert len(set(shapes.all_captions())) == 18


def test_shapes_checkpoint_ships_and_loads_in_transformers(tmp_path):
    from transformers import Emu3Config, Emu3Processor

    path = shapes_checkpoint()
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    assert size_mb <= 25, size_mb
    config = Emu3Config.from_pretrained(path)
    processor = Emu3Processor.from_pretrained(path)
    assert config.vq_config.codebook_size == len([t for t in config.vocabulary_map if t.startswith("<|visual token")])
    # A 64x64 picture is an 8x8 grid of visual tokens.
    inputs = processor.image_processor(images=[shapes.samples(1, seed=0)[0].image()], return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [[SIZE, SIZE]]
    assert processor.chat_template

    from emu3_vllm.cli import main

    assert main(["make-checkpoint", str(tmp_path / "copy"), "--size", "shapes"]) == 0
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in path.iterdir())
    assert json.loads((tmp_path / "copy" / "emu3_vllm.json").read_text())["size"] == "shapes"


def test_a_built_wheel_ships_the_checkpoint(tmp_path):
    """A non-editable install has the checkpoint: it is package data of the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(shapes_checkpoint().parents[2])], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("emu3_vllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in shapes_checkpoint().iterdir():
        assert f"emu3_vllm/shapes/checkpoint/{file.name}" in names


# ----------------------------------------------------------------------------------------------------------------
# Seeing


@pytest.mark.engine
def test_understanding_answers_colour_and_shape(shapes_engine):
    fresh = shapes.samples(60, seed=UNDERSTANDING_SEED)
    images = [s.image() for s in fresh]
    accuracy = {}
    for question in (shapes.COLOUR_QUESTION, shapes.SHAPE_QUESTION, shapes.DESCRIBE_QUESTION):
        answers = _ask(shapes_engine, images, question)
        assert all(a.error is None for a in answers)
        accuracy[question] = float(np.mean([a.strip() == s.answer(question) for a, s in zip(answers, fresh)]))
    print(f"\nunderstanding accuracy on 60 fresh images: {json.dumps(accuracy)}")
    assert accuracy[shapes.COLOUR_QUESTION] >= 0.9, accuracy
    assert accuracy[shapes.SHAPE_QUESTION] >= 0.9, accuracy


@pytest.mark.engine
def test_vq_round_trip_keeps_the_picture_where_it_was(shapes_engine):
    """The engine's VQ encoder, then the VQ decoder: PSNR >= 25 dB, and the shape stays put (nothing transposed
    or flipped: the centroid moves less than 2 px)."""
    fresh = shapes.samples(24, seed=VQ_SEED)
    originals = [s.image() for s in fresh]
    grids = _codes_of(shapes_engine, [shapes_engine.image_tokens([image])[0] for image in originals])
    decoded = shapes_engine.decode_images(grids)
    psnr = [shapes.psnr(a, b) for a, b in zip(originals, decoded)]
    moved = [math.dist(shapes.mask_centroid(shapes.non_white_mask(a)), shapes.mask_centroid(shapes.non_white_mask(b)))
             for a, b in zip(originals, decoded)]
    print(f"\nVQ round trip: PSNR mean {np.mean(psnr):.2f} dB (min {min(psnr):.2f}), centroid shift max "
          f"{max(moved):.2f} px")
    assert np.mean(psnr) >= 25, psnr
    assert max(moved) <= 2, moved


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _accuracy(results, captions):
    read = [shapes.classify(r.image) for r in results]
    colour = float(np.mean([c == cap.split()[1] for (c, _), cap in zip(read, captions)]))
    shape = float(np.mean([s == cap.split()[2] for (_, s), cap in zip(read, captions)]))
    return colour, shape


@pytest.mark.engine
def test_drawings_follow_their_captions_and_guidance_helps(shapes_engine):
    captions = shapes.all_captions() * len(GENERATION_SEEDS)
    seeds = [base + i for base in GENERATION_SEEDS for i in range(18)]
    by_scale = {scale: _accuracy(_draw(shapes_engine, captions, scale, seeds), captions) for scale in (1.0, 3.0)}
    print(f"\ngeneration (18 captions x 2 seeds), (colour, shape) accuracy by CFG scale: {by_scale}")
    colour, shape = by_scale[3.0]
    assert colour >= 0.9 and shape >= 0.8, by_scale
    assert by_scale[3.0][0] >= by_scale[1.0][0], by_scale


FP8_SEEDS = tuple(range(11000, 27000, 1000))  # 18 captions x 16 seeds: a score moves by 1/288 per image


@pytest.mark.engine
def test_an_fp8_kv_cache_draws_and_answers_as_well_as_the_model_dtype_one():
    """bf16 weights (as on a GPU), the KV cache in bf16 ("auto") and in fp8: drawings (18 captions x 16 seeds at cfg
    3) and answers about 30 fresh pictures score within 0.05 of each other. Rounding the cache changes samples, so
    images differ; what they show does not."""
    from helpers.engines import ENGINE_KWARGS

    from emu3_vllm import Emu3

    captions = shapes.all_captions() * len(FP8_SEEDS)
    seeds = [base + i for base in FP8_SEEDS for i in range(18)]
    pictures = shapes.samples(30, seed=UNDERSTANDING_SEED + 7)
    scores = {}
    for kv in ("auto", "fp8"):
        engine = Emu3(shapes_checkpoint(), **{**ENGINE_KWARGS, "dtype": "bfloat16", "kv_cache_dtype": kv,
                                              "max_num_seqs": 64})
        try:
            colour, shape = _accuracy(_draw(engine, captions, 3.0, seeds), captions)
            answers = _ask(engine, [p.image() for p in pictures], shapes.COLOUR_QUESTION)
            understood = float(np.mean([a.strip() == p.answer(shapes.COLOUR_QUESTION)
                                        for a, p in zip(answers, pictures)]))
        finally:
            engine.close()
        scores[kv] = {"colour": colour, "shape": shape, "understanding colour": understood}
    print(f"\nKV cache auto vs fp8 (bf16 weights): {scores}")
    for name in scores["auto"]:
        assert abs(scores["fp8"][name] - scores["auto"][name]) <= 0.05, scores


@pytest.mark.engine
def test_visual_chain_of_thought_reads_back_what_it_drew(shapes_engine):
    """Stage 1 draws "a {colour} {shape}"; stage 2, asked the colour of the drawn picture, answers it."""
    captions = shapes.all_captions()
    drawn = _draw(shapes_engine, captions, 3.0, [VCOT_SEED + i for i in range(len(captions))])
    answers = _ask(shapes_engine, [r.image for r in drawn], shapes.COLOUR_QUESTION)
    accuracy = float(np.mean([a.strip() == cap.split()[1] for a, cap in zip(answers, captions)]))
    print(f"\nvisual CoT colour accuracy: {accuracy:.3f}")
    assert accuracy >= 0.8


@pytest.mark.engine
def test_the_demo_answers_right_and_draws_its_captions(shapes_engine, tmp_path):
    """`emu3-vllm demo`, the README's first command, on the session's engine."""
    import io

    from emu3_vllm.shapes.demo import DEMO_CAPTIONS, run_demo

    out = io.StringIO()
    assert run_demo(tmp_path, engine=shapes_engine, stdout=out) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    answers = [r for r in records if "question" in r]
    drawn = [r for r in records if "prompt" in r]
    assert len(answers) == 9 and {Path(r["image"]).name.split("_")[2] for r in answers} == {"circle.png", "square.png",
                                                                                           "triangle.png"}
    assert sum(r["answer"].strip() == r["expected"] for r in answers) >= 8, answers
    assert [r["prompt"] for r in drawn] == list(DEMO_CAPTIONS)
    assert all(Path(r["image"]).is_file() for r in drawn)
    assert sum(r["read_back"] == r["prompt"] for r in drawn) >= 4, drawn
    assert records[-1]["contact_sheet"] == str(tmp_path / "contact_sheet.png")
    assert (tmp_path / "contact_sheet.png").stat().st_size > 10_000
    assert shapes_engine.generate_images(["a red square"], height=SIZE, width=SIZE, use_tqdm=False)[0].error is None


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers on trained weights


@pytest.fixture(scope="module")
def hf_shapes():
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    path = shapes_checkpoint()
    return Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval(), \
        Emu3Processor.from_pretrained(path)


@pytest.mark.engine
def test_greedy_generation_matches_transformers(shapes_engine, hf_shapes):
    from emu3_vllm.layout import parse_image_tokens
    from emu3_vllm.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX
    from emu3_vllm.testing.hf_reference import hf_generate_image_tokens

    model, processor = hf_shapes
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow square"]
    results = _draw(shapes_engine, captions, 3.0, range(len(captions)), temperature=0.0)
    for caption, result in zip(captions, results):
        cond, uncond = shapes_engine.image_generation_prompts(caption, 8, 8, NEGATIVE_PROMPT, POSITIVE_SUFFIX)
        ref = hf_generate_image_tokens(model, processor.tokenizer, cond, uncond, 8, 8, 3.0, shapes_engine.token_ids)
        assert parse_image_tokens(ref, 8, 8, shapes_engine.token_ids) == result.codes, caption
        assert shapes.classify(result.image)[0] == caption.split()[1]  # greedy guidance keeps the colour


@pytest.mark.engine
def test_greedy_understanding_matches_transformers(shapes_engine, hf_shapes):
    from emu3_vllm.testing.hf_reference import hf_understand

    model, processor = hf_shapes
    fresh = shapes.samples(3, seed=UNDERSTANDING_SEED + 1)
    items = [(q, [s.image()]) for s in fresh for q in shapes.QUESTIONS]
    answers = shapes_engine.understand(items, max_new_tokens=24, use_tqdm=False)
    eos = processor.tokenizer.eos_token_id
    for (question, images), answer in zip(items, answers):
        assert answer.error is None, answer.error
        expected = hf_understand(model, processor, question, images, max_new_tokens=24)
        assert _until_eos(answer.token_ids, eos) == _until_eos(expected, eos), question


def _until_eos(ids, eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids
