"""Real `python -m lmms_eval` runs, offline, on local tiny tasks and the tests' tiny checkpoints."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import random_image

pytest.importorskip("lmms_eval")

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
    (root / "utils.py").write_text(UTILS)
    specs = {
        "emu3_tiny_und": (und, "generate_until", "doc_to_visual", "doc_to_text", "exact_match",
                          "  max_new_tokens: 8\n  do_sample: false\n  temperature: 0"),
        "emu3_tiny_gen": (gen, "generate_until", "no_visual", "doc_to_text", "images_written",
                          "  max_new_tokens: 8"),
        "emu3_tiny_vcot": (vcot, "generate_visual_cot", "doc_to_visual", "vcot_text", "exact_match",
                           "  visual_cot: true\n  max_new_tokens: 8\n  do_sample: false\n  temperature: 0"),
    }
    for name, (rows, output_type, visual, text, metric, gen_kwargs) in specs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=data, output_type=output_type, visual=visual,
                                                       text=text, metric=metric, gen_kwargs=gen_kwargs))
    return {"root": root, "und": und, "images": images}


ENGINE_ARGS = "dtype=float32,max_model_len=1024,enforce_eager=true"


def run_lmms_eval(model: str, model_args: str, task: str, tasks_dir, out: Path, *extra: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(out / "hf_cache"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", task,
           "--include_path", str(tasks_dir["root"]), "--batch_size", "4", "--output_path", str(out / "results"),
           "--log_samples", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    results = glob.glob(str(out / "results" / "**" / "*_results.json"), recursive=True)
    samples = glob.glob(str(out / "results" / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    return proc, (json.loads(Path(results[0]).read_text()) if results else None), \
        ([json.loads(line) for line in Path(samples[0]).read_text().splitlines()] if samples else [])


def _response(sample) -> str:
    resp = sample["filtered_resps"]
    while isinstance(resp, list):
        resp = resp[0]
    return resp


def test_understanding_task_end_to_end_matches_the_offline_api(checkpoints, engine_factory, tasks_dir, tmp_path):
    args = f"pretrained={checkpoints['a']},mode=understanding,max_new_tokens=8,{ENGINE_ARGS},fail_gracefully=true"
    proc, results, samples = run_lmms_eval("emu3_vllm", args, "emu3_tiny_und", tasks_dir, tmp_path)
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exact_match,none" in results["results"]["emu3_tiny_und"]
    by_doc = {s["doc_id"]: _response(s) for s in samples}
    assert by_doc[2] == ""  # corrupt image: empty answer, run completed
    assert "emu3_tiny_und doc 2" in proc.stderr + proc.stdout

    from PIL import Image

    und = tasks_dir["und"]
    items = [(d["question"], [Image.open(p).convert("RGB") for p in d["images"]]) for i, d in enumerate(und) if i != 2]
    offline = engine_factory("a").understand(items, max_new_tokens=8, use_tqdm=False)
    assert [by_doc[i].strip() for i in (0, 1, 3)] == [str(a).strip() for a in offline]


def test_understanding_without_fail_gracefully_stops_naming_the_doc(checkpoints, tasks_dir, tmp_path):
    args = f"pretrained={checkpoints['a']},mode=understanding,max_new_tokens=8,{ENGINE_ARGS},fail_gracefully=false"
    proc, results, _ = run_lmms_eval("emu3_vllm", args, "emu3_tiny_und", tasks_dir, tmp_path)
    assert results is None
    assert "emu3_tiny_und doc 2: cannot load its images" in proc.stdout + proc.stderr


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
