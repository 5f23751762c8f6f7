"""Real `python -m lmms_eval` runs, offline, on local tiny tasks and the tests' tiny checkpoints."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.engines import random_image
from helpers.env import subprocess_env

from emu3_vllm import shapes
from emu3_vllm.shapes.trained import shapes_checkpoint

pytest.importorskip("lmms_eval")

SHAPES_VQA_SEED = 1003  # fresh pictures of the shapes world for the trained checkpoint's VQA task

UTILS = '''
import json
import os
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(p).convert("RGB") for p in doc["images"]]


def no_visual(doc):
    return []


def doc_to_text(doc):
    return doc["question"]


def vcot_text(doc):
    return f"[GEN_PROMPT]{doc['draw']}[/GEN_PROMPT]\\n[QUESTION]{doc['question']}[/QUESTION]"


def exact_match(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}


def images_written(doc, results):
    out = json.loads(results[0])
    return {"images_written": float(bool(out["images"]) and all(os.path.isfile(p) for p in out["images"]))}
'''

TASK = '''
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.{visual}
doc_to_text: !function utils.{text}
doc_to_target: answer
generation_kwargs:
{gen_kwargs}
process_results: !function utils.{metric}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
'''


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_tasks")
    images = []
    for i, (h, w) in enumerate([(48, 48), (40, 72), (64, 32)]):
        path = root / f"img{i}.png"
        random_image(h, w, seed=20 + i).save(path)
        images.append(str(path))
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    und = [
        {"question": "What is in the picture?", "images": [images[0]], "answer": "a cat"},
        {"question": "Compare the two pictures.", "images": [images[1], images[2]], "answer": "same"},
        {"question": "Is this broken?", "images": [str(corrupt)], "answer": "yes"},
        {"question": "Say hello.", "images": [], "answer": "hello"},
    ]
    gen = [{"question": "a red emu", "images": [], "answer": ""}, {"question": "a cat", "images": [], "answer": ""}]
    vcot = [{"question": "How many corners?", "draw": "a square", "images": [images[0]], "answer": "4"},
            {"question": "Which is taller?", "draw": "two towers", "images": [images[2]], "answer": "left"}]
    vcot_dp = [*vcot, {"question": "Is this broken?", "draw": "a crack", "images": [str(corrupt)], "answer": "no"},
               {"question": "What colour?", "draw": "a red ball", "images": [images[1]], "answer": "red"}]
    # The shapes world's questions about fresh pictures, for the trained shapes checkpoint.
    shapes_vqa = []
    for i, sample in enumerate(shapes.samples(20, seed=SHAPES_VQA_SEED)):
        path = root / f"shape{i}.png"
        sample.image().save(path)
        question = shapes.QUESTIONS[i % len(shapes.QUESTIONS)]
        shapes_vqa.append({"question": question, "images": [str(path)], "answer": sample.answer(question)})
    (root / "utils.py").write_text(UTILS)
    specs = {
        "shapes_vqa": (shapes_vqa, "generate_until", "doc_to_visual", "doc_to_text", "exact_match",
                       "  max_new_tokens: 24\n  do_sample: false\n  temperature: 0"),
        "emu3_tiny_und": (und, "generate_until", "doc_to_visual", "doc_to_text", "exact_match",
                          "  max_new_tokens: 8\n  do_sample: false\n  temperature: 0"),
        "emu3_tiny_gen": (gen, "generate_until", "no_visual", "doc_to_text", "images_written",
                          "  max_new_tokens: 8"),
        "emu3_tiny_vcot": (vcot, "generate_visual_cot", "doc_to_visual", "vcot_text", "exact_match",
                           "  visual_cot: true\n  max_new_tokens: 8\n  do_sample: false\n  temperature: 0"),
        "emu3_tiny_vcot_dp": (vcot_dp, "generate_visual_cot", "doc_to_visual", "vcot_text", "exact_match",
                              "  visual_cot: true\n  max_new_tokens: 8\n  do_sample: false\n  temperature: 0"),
    }
    for name, (rows, output_type, visual, text, metric, gen_kwargs) in specs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=data, output_type=output_type, visual=visual,
                                                       text=text, metric=metric, gen_kwargs=gen_kwargs))
    return {"root": root, "und": und, "images": images, "vcot_dp": vcot_dp, "shapes_vqa": shapes_vqa}


ENGINE_ARGS = "dtype=float32,max_model_len=1024,enforce_eager=true"


def run_lmms_eval(model: str, model_args: str, task: str, tasks_dir, out: Path, *extra: str,
                  launcher: tuple[str, ...] = (), env: dict | None = None):
    """`python -m lmms_eval` offline on the local tasks: (process, results JSON or None, the first task's logged
    samples). `task` may name several, comma-separated (`logged_samples` reads the others')."""
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                         HF_DATASETS_CACHE=str(out / "hf_cache"), **(env or {}))
    cmd = [sys.executable, *launcher, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", task,
           "--include_path", str(tasks_dir["root"]), "--batch_size", "4", "--output_path", str(out / "results"),
           "--log_samples", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    results = glob.glob(str(out / "results" / "**" / "*_results.json"), recursive=True)
    return proc, (json.loads(Path(results[0]).read_text()) if results else None), \
        logged_samples(out, task.split(",")[0])


def logged_samples(out: Path, task: str) -> list[dict]:
    samples = glob.glob(str(out / "results" / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    return [json.loads(line) for line in Path(samples[0]).read_text().splitlines()] if samples else []


def _response(sample) -> str:
    resp = sample["filtered_resps"]
    while isinstance(resp, list):
        resp = resp[0]
    return resp


@pytest.mark.engine
def test_understanding_tasks_end_to_end_match_the_offline_api(shapes_engine, tasks_dir, tmp_path):
    """One lmms-eval run of the trained shapes checkpoint on two tasks: answers equal `Emu3.understand`'s, a doc
    whose image is corrupt fails alone, and the shapes questions about fresh pictures are answered right."""
    from PIL import Image

    args = f"pretrained={shapes_checkpoint()},mode=understanding,max_new_tokens=8,{ENGINE_ARGS},fail_gracefully=true"
    proc, results, samples = run_lmms_eval("emu3_vllm", args, "emu3_tiny_und,shapes_vqa", tasks_dir, tmp_path)
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exact_match,none" in results["results"]["emu3_tiny_und"]
    by_doc = {s["doc_id"]: _response(s) for s in samples}
    assert by_doc[2] == ""  # corrupt image: empty answer, run completed
    assert "emu3_tiny_und doc 2" in proc.stderr + proc.stdout

    und = tasks_dir["und"]
    items = [(d["question"], [Image.open(p).convert("RGB") for p in d["images"]]) for i, d in enumerate(und) if i != 2]
    offline = shapes_engine.understand(items, max_new_tokens=8, use_tqdm=False)
    assert [by_doc[i].strip() for i in (0, 1, 3)] == [str(a).strip() for a in offline]

    rows = tasks_dir["shapes_vqa"]
    shapes_samples = logged_samples(tmp_path, "shapes_vqa")
    exact_match = results["results"]["shapes_vqa"]["exact_match,none"]
    right = sum(_response(s).strip() == rows[s["doc_id"]]["answer"] for s in shapes_samples)
    print(f"\nlmms-eval shapes_vqa exact_match: {exact_match:.3f} ({right}/{len(rows)})")
    assert len(shapes_samples) == len(rows) and exact_match >= 0.9


@pytest.mark.engine
def test_understanding_without_fail_gracefully_stops_naming_the_doc(checkpoints, tasks_dir, tmp_path):
    args = f"pretrained={checkpoints['a']},mode=understanding,max_new_tokens=8,{ENGINE_ARGS},fail_gracefully=false"
    proc, results, _ = run_lmms_eval("emu3_vllm", args, "emu3_tiny_und", tasks_dir, tmp_path)
    assert results is None
    assert "emu3_tiny_und doc 2: cannot load its images" in proc.stdout + proc.stderr


@pytest.mark.engine
def test_generation_task_writes_images_and_returns_json(checkpoints, tasks_dir, tmp_path):
    out_dir = tmp_path / "images"
    args = (f"pretrained={checkpoints['a']},mode=generation,image_height=32,image_width=32,cfg_scale=3.0,"
            f"output_image_dir={out_dir},{ENGINE_ARGS}")
    proc, results, samples = run_lmms_eval("emu3_vllm", args, "emu3_tiny_gen", tasks_dir, tmp_path, "--predict_only")
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["emu3_tiny_gen_0_0.png", "emu3_tiny_gen_1_0.png"]
    for sample in samples:
        payload = json.loads(_response(sample))
        assert payload["text"] == "" and payload["images"] == [str(out_dir / f"emu3_tiny_gen_{sample['doc_id']}_0.png")]


@pytest.mark.engine
def test_visual_cot_runs_both_stages_and_saves_intermediates(checkpoints, tasks_dir, tmp_path):
    inter = tmp_path / "intermediate"
    args = (f"pretrained={checkpoints['a']},gen_pretrained={checkpoints['b']},stage1_image_height=32,"
            f"stage1_image_width=32,stage1_cfg_scale=3.0,stage2_max_new_tokens=8,save_intermediate=true,"
            f"intermediate_dir={inter},{ENGINE_ARGS}")
    proc, results, samples = run_lmms_eval("emu3_vllm_visual_cot", args, "emu3_tiny_vcot", tasks_dir, tmp_path)
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exact_match,none" in results["results"]["emu3_tiny_vcot"]
    assert len(samples) == 2
    for doc_id in (0, 1):
        meta = json.loads((inter / "emu3_tiny_vcot" / f"{doc_id}_metadata.json").read_text())
        assert meta["generated_images"] == [str(inter / "emu3_tiny_vcot" / f"{doc_id}_stage1_0.png")]
        assert Path(meta["generated_images"][0]).is_file()
        assert meta["generation_prompt"] == ["a square", "two towers"][doc_id]
        assert meta["question"] == ["How many corners?", "Which is taller?"][doc_id]
        assert meta["stage2_answer"].strip() == _response(next(s for s in samples if s["doc_id"] == doc_id))


def test_launch_sizes_are_checked_against_the_torchrun_world(monkeypatch):
    from emu3_vllm.lmms.torchrun import Launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Launch.from_env(2, None).engine_kwargs() == {"tensor_parallel_size": 2}  # one process, its own ranks
    with pytest.raises(ValueError, match="data_parallel_size=2 needs one process per rank: launch with torchrun "
                                         "--nproc_per_node=4"):
        Launch.from_env(2, 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    launch = Launch.from_env(2, None)  # data_parallel_size follows from the world
    assert (launch.rank, launch.data_parallel_size) == (3, 2)
    assert launch.engine_kwargs() == {"tensor_parallel_size": 2, "distributed_executor_backend": "external_launcher",
                                      "data_parallel_size": 2}
    with pytest.raises(ValueError, match=r"tensor_parallel_size \* data_parallel_size = 1 \* 2 = 2"):
        Launch.from_env(1, 2)
    with pytest.raises(ValueError, match="which tensor_parallel_size=3 does not divide"):
        Launch.from_env(3, None)


# torchrun as users start it (`torchrun --nproc_per_node=2 -m lmms_eval ...`), on a free port.
TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.mark.engine
def test_data_parallel_torchrun_understanding_matches_one_rank(checkpoints, engine_factory, tasks_dir, tmp_path):
    """Two ranks on vLLM's external launcher: each answers its share (rank 0 has the corrupt image, rank 1 only good
    docs), lmms-eval gathers, and the answers are the single-engine ones."""
    args = (f"pretrained={checkpoints['a']},mode=understanding,max_new_tokens=8,{ENGINE_ARGS},fail_gracefully=true,"
            "data_parallel_size=2")
    proc, results, samples = run_lmms_eval("emu3_vllm", args, "emu3_tiny_und", tasks_dir, tmp_path,
                                           launcher=TORCHRUN_2)
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "exact_match,none" in results["results"]["emu3_tiny_und"]
    log = proc.stdout + proc.stderr
    assert "emu3_vllm: rank 0 of 2 takes 2 requests" in log and "emu3_vllm: rank 1 of 2 takes 2 requests" in log
    by_doc = {s["doc_id"]: _response(s) for s in samples}
    assert sorted(by_doc) == [0, 1, 2, 3]
    assert by_doc[2] == ""  # the corrupt image: an empty answer on its rank, the run completed

    from PIL import Image

    und = tasks_dir["und"]
    items = [(d["question"], [Image.open(p).convert("RGB") for p in d["images"]]) for i, d in enumerate(und) if i != 2]
    offline = engine_factory("a").understand(items, max_new_tokens=8, use_tqdm=False)
    assert [by_doc[i].strip() for i in (0, 1, 3)] == [str(a).strip() for a in offline]



@pytest.mark.engine
def test_data_parallel_torchrun_visual_cot_draws_and_answers_as_one_engine(checkpoints, engine_factory, tasks_dir,
                                                                           tmp_path):
    """Visual CoT on two ranks (data_parallel_size follows from the 2 processes): rank 0 has one drawable doc and
    the corrupt image, rank 1 two docs, so rank 0's engines idle in lockstep while rank 1 still draws and answers.
    Every stage-1 image is the one a single engine draws with the same seed (`seed` + doc id), and every answer
    the one a single engine gives with that image."""
    import numpy as np
    from PIL import Image

    inter = tmp_path / "intermediate"
    args = (f"pretrained={checkpoints['a']},gen_pretrained={checkpoints['b']},stage1_image_height=32,"
            f"stage1_image_width=32,stage1_cfg_scale=3.0,stage2_max_new_tokens=8,save_intermediate=true,"
            f"intermediate_dir={inter},{ENGINE_ARGS},max_num_seqs=2")  # one image at a time: rank 1 draws longer
    proc, results, samples = run_lmms_eval("emu3_vllm_visual_cot", args, "emu3_tiny_vcot_dp", tasks_dir, tmp_path,
                                           launcher=TORCHRUN_2)
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "emu3_vllm: rank 0 of 2 takes 2 requests" in log and "emu3_vllm: rank 1 of 2 takes 2 requests" in log
    assert "emu3_tiny_vcot_dp doc 2: cannot load its images" in log
    by_doc = {s["doc_id"]: _response(s) for s in samples}
    assert sorted(by_doc) == [0, 1, 2, 3] and by_doc[2] == ""

    docs = [d for i, d in enumerate(tasks_dir["vcot_dp"]) if i != 2]
    drawn = engine_factory("b").generate_images([d["draw"] for d in docs], height=32, width=32, cfg_scale=3.0,
                                                seed=[0, 1, 3], use_tqdm=False)
    questions = []
    for doc_id, doc, expected in zip((0, 1, 3), docs, drawn):
        meta = json.loads((inter / "emu3_tiny_vcot_dp" / f"{doc_id}_metadata.json").read_text())
        with Image.open(meta["generated_images"][0]) as image:
            # Each rank decodes its own images; VQ decode is batch- and thread-invariant, so pixels are exact.
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.image.convert("RGB"))), doc_id
            drawn_there = image.convert("RGB")
        questions.append((doc["question"], [Image.open(doc["images"][0]).convert("RGB"), drawn_there]))
        assert meta["stage2_answer"].strip() == by_doc[doc_id].strip()
    answers = engine_factory("a").understand(questions, max_new_tokens=8, use_tqdm=False)
    assert [by_doc[i].strip() for i in (0, 1, 3)] == [str(a).strip() for a in answers]
