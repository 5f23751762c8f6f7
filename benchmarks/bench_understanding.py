"""Image question answering throughput: emu3_vllm against vLLM's Transformers backend and transformers, in one run.

    python benchmarks/bench_understanding.py --size small --num-prompts 32 \
        --out benchmarks/results/understanding_cpu_small.json

(a) emu3_vllm     `Emu3.understand`: the native vLLM model (VQ encoder inside, vLLM's Llama layers).
(b) vLLM backend  `vllm.LLM(model_impl="transformers")`: vLLM running transformers' Emu3 modules, the path vLLM
                  falls back to without emu3_vllm's native model; same engine settings, same prompts.
(c) transformers  `Emu3ForConditionalGeneration.generate`, batch 1, greedy.

Every prompt is one image plus a question and generates exactly --max-new-tokens tokens (EOS ignored), so all
three do the same work. Reports answers/s and generated tokens/s, prints a table, writes JSON (--out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "What colors dominate?",
             "Is there a person in this image?"]


def items(n: int, size: int, take: int = 0):
    """n image questions; another `take` gives other images, so no timed run hits vLLM's multimodal caches."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(take + 1)
    return [(QUESTIONS[i % len(QUESTIONS)],
             Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))) for i in range(n)]


def summarize(label, n, tokens, seconds, extra=None):
    print(f"{label:14s} {n:4d} prompts: {seconds:8.3f} s  {n / seconds:8.3f} answers/s  "
          f"{tokens / seconds:9.1f} tokens/s", flush=True)
    return {"prompts": n, "seconds": round(seconds, 4), "answers_per_s": n / seconds,
            "generated_tokens_per_s": tokens / seconds, **(extra or {})}


def run_emu3(ckpt, kwargs, args):
    from emu3_vllm import Emu3

    with _common.PeakMemory() as mem:
        with _common.timed() as start:
            engine = Emu3(ckpt, **kwargs)
        model_class = engine.model_class()
        gen = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True, use_tqdm=False)
        engine.understand(items(2, args.image_size, take=-1), **gen)  # warm-up
        times, tokens = [], 0
        for take in range(args.repeats):
            batch = items(args.num_prompts, args.image_size, take)
            with _common.timed() as t:
                answers = engine.understand(batch, **gen)
            times.append(t["seconds"])
            tokens = sum(len(a.token_ids) for a in answers)
        engine.close()
    seconds, spread = _common.best_and_median(times)
    return summarize("emu3_vllm", len(batch), tokens, seconds,
                     {**spread, "engine_start_s": round(start["seconds"], 2), "model_class": model_class,
                      "peak_memory_gib": mem.gib})


def run_vllm_transformers_backend(ckpt, kwargs, args):
    from transformers import Emu3Processor
    from vllm import LLM, SamplingParams

    from emu3_vllm.offline.items import UnderstandingItem
    from emu3_vllm.offline.understanding import build_prompt

    processor = Emu3Processor.from_pretrained(ckpt)

    def requests(batch):
        return [{"prompt": build_prompt(UnderstandingItem(text, (image,)), processor),
                 "multi_modal_data": {"image": [image]}} for text, image in batch]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("logits_processors", "scheduler_cls")}
    with _common.PeakMemory() as mem:
        with _common.timed() as start:
            llm = LLM(model=ckpt, model_impl="transformers", **kwargs)
        from emu3_vllm.engine import shutdown_llm
        from emu3_vllm.vllm_plugin import probes

        model_class = llm.apply_model(probes.model_class_path)[0]
        llm.generate(requests(items(2, args.image_size, take=-1)), params, use_tqdm=False)  # warm-up
        times, tokens = [], 0
        for take in range(args.repeats):
            batch = requests(items(args.num_prompts, args.image_size, take))
            with _common.timed() as t:
                outputs = llm.generate(batch, params, use_tqdm=False)
            times.append(t["seconds"])
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        shutdown_llm(llm)
    seconds, spread = _common.best_and_median(times)
    return summarize("vLLM backend", len(batch), tokens, seconds,
                     {**spread, "engine_start_s": round(start["seconds"], 2), "model_class": model_class,
                      "peak_memory_gib": mem.gib})


def run_transformers(ckpt, batch, args):
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    from emu3_vllm.testing.hf_reference import hf_understand

    dtype = getattr(torch, args.dtype or ("bfloat16" if _common.has_cuda() else "float32"))
    device = "cuda" if _common.has_cuda() else "cpu"
    model = Emu3ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    processor = Emu3Processor.from_pretrained(ckpt)
    n = args.max_new_tokens
    with _common.PeakMemory() as mem:
        hf_understand(model, processor, batch[0][0], [batch[0][1]], max_new_tokens=2)  # warm-up
        times = []
        for text, image in batch[:args.hf_prompts]:
            with _common.timed() as t:
                hf_understand(model, processor, text, [image], max_new_tokens=n, min_new_tokens=n)
            times.append(t["seconds"])
    seconds, spread = _common.best_and_median(times)  # per prompt: the fastest, as for the vLLM contenders
    return summarize("transformers", 1, n, seconds, {**spread, "prompts_measured": len(times), "batch_size": 1,
                                                     "peak_memory_gib": mem.gib})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="side of the square random input images (px)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per vLLM measurement (the fastest is reported)")
    parser.add_argument("--hf-prompts", type=int, default=4, help="prompts transformers answers (batch 1)")
    args = parser.parse_args(argv)

    # Lets the script ask each engine which model class it runs (LLM.apply_model pickles the probe).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    threads = _common.configure_threads(args.threads)
    ckpt = _common.checkpoint(args)
    batch = items(args.num_prompts, args.image_size)
    kwargs = _common.engine_args(args, max_num_seqs=args.num_prompts,
                                 max_model_len=min(4096, _common.max_positions(ckpt)))
    result = {"benchmark": "understanding", "size": None if args.checkpoint else args.size, "checkpoint": ckpt,
              "decoder_parameters": _common.count_parameters(ckpt), "num_prompts": args.num_prompts,
              "image_size": args.image_size, "max_new_tokens": args.max_new_tokens, "engine_args": kwargs,
              "environment": _common.environment(threads)}
    result["emu3_vllm"] = run_emu3(ckpt, kwargs, args)
    if not args.skip_peer:
        result["vllm_transformers_backend"] = run_vllm_transformers_backend(ckpt, kwargs, args)
    if not args.skip_hf:
        result["transformers"] = run_transformers(ckpt, batch, args)

    ours = result["emu3_vllm"]["answers_per_s"]
    ratios, targets = {}, {}
    if "vllm_transformers_backend" in result:
        ratios["emu3_vllm_over_vllm_transformers_backend"] = ours / result["vllm_transformers_backend"]["answers_per_s"]
    if "transformers" in result:
        ratios["emu3_vllm_over_transformers"] = ours / result["transformers"]["answers_per_s"]
        targets["emu3_vllm >= 5 x transformers"] = ratios["emu3_vllm_over_transformers"] >= 5
    result["ratios"], result["targets_met"] = ratios, targets

    print()
    rows = [[name, result[key]["prompts"] if key != "transformers" else 1, result[key]["answers_per_s"],
             result[key]["generated_tokens_per_s"], result[key]["peak_memory_gib"]]
            for name, key in (("emu3_vllm", "emu3_vllm"), ("vLLM transformers backend", "vllm_transformers_backend"),
                              ("transformers b=1", "transformers")) if key in result]
    _common.print_table(["contender", "concurrency", "answers/s", "tokens/s", "peak GiB"], rows)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    _common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
