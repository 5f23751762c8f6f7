"""Text-to-image throughput with CFG: emu3_vllm against plain vLLM decoding and transformers, in one run.

    python benchmarks/bench_generation.py --size small --num-images 32 --height 64 --width 64 \
        --out benchmarks/results/generation_cpu_small.json

(a) emu3_vllm  `Emu3.generate_images`: pair-aware scheduler, CFG logits processor, layout; images/s, image tokens/s.
(b) plain vLLM the same engine settings and model, stock scheduler, no processor: 2 rows per image (the same cond
               and uncond prompts), each decoding exactly the image's token count, greedy: the ceiling for (a).
               Also once with top-k sampling as vLLM's own sampler does it, for reference.
(c) transformers `Emu3ForConditionalGeneration.generate` with CFG (guidance_scale + negative prompt) and Emu3's
               layout, batch 1: how Emu3 is run today. With --hf-max-tokens below the image's length it measures
               that many tokens and reports the per-image time it implies (marked "extrapolated").

All three use the same checkpoint, dtype and thread settings. Throughput is measured at several concurrencies
(images submitted at once), each the fastest of --repeats runs after a warm-up (the JSON keeps all of them);
the ratios use the largest concurrency.
Prints a table, writes JSON (--out) and a PNG plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT_SUBJECTS = ["a red emu", "a lighthouse at dawn", "a bowl of ramen", "a snowy forest", "a city at night",
                   "a watercolor fox", "an old sailing ship", "a mountain lake"]


def prompts(n: int, take: int = 0) -> list[str]:
    """n distinct prompts; another `take` gives other prompts, so no timed run reuses an earlier run's prefix
    cache (only the shared negative prompt is meant to be cached)."""
    return [f"{PROMPT_SUBJECTS[i % len(PROMPT_SUBJECTS)]}, picture {i}, take {take}" for i in range(n)]


def run_emu3(ckpt, args, kwargs, concurrencies):
    from emu3_vllm import Emu3
    from emu3_vllm.layout import num_image_tokens, pixels_to_grid
    from emu3_vllm.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX

    h, w = pixels_to_grid(args.height, args.width)
    n_tokens = num_image_tokens(h, w)
    out = {"by_concurrency": []}
    with _common.PeakMemory() as mem:
        with _common.timed() as start:
            engine = Emu3(ckpt, **kwargs)
        out["engine_start_s"] = round(start["seconds"], 2)
        out["model_runner"] = "v2" if engine.uses_v2_runner else "v1"
        gen = dict(height=args.height, width=args.width, cfg_scale=args.cfg_scale, top_k=args.top_k, use_tqdm=False)
        engine.generate_images(prompts(2, take=-1), seed=0, decode=False, **gen)  # warm-up
        results, take = [], 0
        for c in concurrencies:
            times = []
            for _ in range(args.repeats):
                take += 1
                with _common.timed() as t:
                    results = engine.generate_images(prompts(c, take), seed=1000, decode=False, **gen)
                times.append(t["seconds"])
            failed = [r.error for r in results if r.error]
            if failed:
                print(f"emu3_vllm: {len(failed)} of {c} images failed, e.g. {failed[0]}", flush=True)
            s, spread = _common.best_and_median(times)
            out["by_concurrency"].append({"images": c, "seconds": round(s, 4), "images_per_s": c / s,
                                          "image_tokens_per_s": c * n_tokens / s, "failed": len(failed), **spread})
            print(f"emu3_vllm   {c:4d} images: {s:8.3f} s  {c / s:8.3f} images/s", flush=True)
        prompt_tokens = sum(r.prompt_tokens for r in results)
        out["prefix_cache_hit_rate"] = sum(r.cached_prompt_tokens for r in results) / max(prompt_tokens, 1)
        ok = [r.codes for r in results if r.codes is not None]
        engine.decode_images(ok[:1])  # loads the VQ decoder
        with _common.timed() as t:
            engine.decode_images(ok)
        out["vq_decode_seconds"] = round(t["seconds"], 4)
        out["vq_decode_images"] = len(ok)
        # Takes for the other contenders: fresh prompt texts (same lengths), each run its own.
        rows = {t: [engine.image_generation_prompts(p, h, w, NEGATIVE_PROMPT, POSITIVE_SUFFIX)
                    for p in prompts(max(concurrencies), t)] for t in range(take + 1, 3 * take + 4)}
        engine.close()
    out["peak_memory_gib"] = mem.gib
    return out, rows, n_tokens


def run_plain(ckpt, kwargs, rows, n_tokens, concurrencies, top_k, repeats):
    """Stock vLLM decoding the same rows: greedy at every concurrency (the pure decode ceiling), and once, at the
    largest, with the same top-k sampling (temperature 1) that (a) does itself."""
    from vllm import LLM, SamplingParams

    kwargs = {k: v for k, v in kwargs.items() if k not in ("logits_processors", "scheduler_cls")}
    fixed = dict(max_tokens=n_tokens, min_tokens=n_tokens, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, **fixed)
    sampled = SamplingParams(temperature=1.0, top_k=top_k, **fixed)
    out = {"by_concurrency": [], "sampling": "greedy"}

    takes = iter(sorted(rows)[1:])

    def measure(llm, c, params, label):
        times = []
        for _ in range(repeats):
            texts = [t for pair in rows[next(takes)][:c] for t in pair]
            with _common.timed() as t:
                outputs = llm.generate(texts, params, use_tqdm=False)
            times.append(t["seconds"])
        s, spread = _common.best_and_median(times)
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"{label} {c:4d} images: {s:8.3f} s  {c / s:8.3f} images/s ({2 * c} rows)", flush=True)
        return {"images": c, "rows": 2 * c, "seconds": round(s, 4), "images_per_s": c / s,
                "row_tokens_per_s": produced / s, "image_tokens_per_s": c * n_tokens / s, **spread}

    with _common.PeakMemory() as mem:
        with _common.timed() as start:
            llm = LLM(model=ckpt, **kwargs)
        out["engine_start_s"] = round(start["seconds"], 2)
        llm.generate([t for pair in rows[min(rows)][:2] for t in pair], greedy, use_tqdm=False)  # warm-up
        for c in concurrencies:
            out["by_concurrency"].append(measure(llm, c, greedy, "plain vLLM greedy"))
        out["top_k_sampling_at_max_concurrency"] = measure(llm, concurrencies[-1], sampled, "plain vLLM top-k  ")
        llm.llm_engine.engine_core.shutdown()
    out["peak_memory_gib"] = mem.gib
    return out


def run_transformers(ckpt, args, rows, n_tokens):
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    from emu3_vllm.hf_reference import hf_generate_image_tokens
    from emu3_vllm.layout import ImageTokenIds, pixels_to_grid

    dtype = getattr(torch, args.dtype or ("bfloat16" if _common.has_cuda() else "float32"))
    device = "cuda" if _common.has_cuda() else "cpu"
    model = Emu3ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    tok = Emu3Processor.from_pretrained(ckpt).tokenizer
    ids = ImageTokenIds.from_tokenizer(tok)
    h, w = pixels_to_grid(args.height, args.width)
    measure = min(n_tokens, args.hf_max_tokens) if args.hf_max_tokens else n_tokens
    gen = dict(do_sample=True, top_k=args.top_k, max_new_tokens=measure)
    with _common.PeakMemory() as mem:
        warm = rows[max(rows) - 1][0]
        hf_generate_image_tokens(model, tok, *warm, h, w, args.cfg_scale, ids, **{**gen, "max_new_tokens": 4})
        tokens, seconds, rates = 0, 0.0, []
        for cond, uncond in rows[max(rows)][:args.hf_images]:
            torch.manual_seed(0)
            with _common.timed() as t:
                n = len(hf_generate_image_tokens(model, tok, cond, uncond, h, w, args.cfg_scale, ids, **gen))
            tokens, seconds = tokens + n, seconds + t["seconds"]
            rates.append(n / t["seconds"])
    tok_s = max(rates)  # the fastest image, as for the vLLM contenders
    print(f"transformers {args.hf_images} images x {measure} tokens: {seconds:.3f} s  {tok_s:.2f} tokens/s", flush=True)
    return {"images_measured": args.hf_images, "tokens_measured": tokens, "seconds": round(seconds, 4),
            "tokens_per_s": tok_s, "tokens_per_s_each": [round(r, 3) for r in rates], "seconds_per_image": n_tokens / tok_s, "images_per_s": tok_s / n_tokens,
            "extrapolated": measure < n_tokens, "batch_size": 1, "peak_memory_gib": mem.gib}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=2048)
    parser.add_argument("--concurrency", default=None,
                        help="comma-separated numbers of images submitted at once (default: 1,8,num-images)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per vLLM measurement (the fastest is reported)")
    parser.add_argument("--hf-images", type=int, default=3,
                        help="images transformers generates one at a time (the fastest is reported)")
    parser.add_argument("--hf-max-tokens", type=int, default=None,
                        help="stop transformers after this many tokens per image and extrapolate")
    parser.add_argument("--plot", help="PNG plot of throughput vs concurrency (default: beside --out)")
    args = parser.parse_args(argv)

    threads = _common.configure_threads(args.threads)
    ckpt = _common.checkpoint(args)
    concurrencies = sorted({int(c) for c in (args.concurrency or f"1,8,{args.num_images}").split(",")
                            if 0 < int(c) <= args.num_images} | {args.num_images})
    from emu3_vllm.layout import num_image_tokens, pixels_to_grid

    h, w = pixels_to_grid(args.height, args.width)
    # Prompts are short: both contenders get the same context and KV budget.
    max_len = min(256 + num_image_tokens(h, w), _common.max_positions(ckpt))
    kwargs = _common.engine_args(args, max_num_seqs=2 * args.num_images, max_model_len=max_len)

    result = {"benchmark": "generation", "size": None if args.checkpoint else args.size, "checkpoint": ckpt,
              "decoder_parameters": _common.count_parameters(ckpt), "num_images": args.num_images,
              "image": {"height": h * 8, "width": w * 8, "grid": [h, w], "tokens_per_image": num_image_tokens(h, w)},
              "cfg_scale": args.cfg_scale, "top_k": args.top_k, "engine_args": kwargs,
              "environment": _common.environment(threads)}
    result["emu3_vllm"], rows, n_tokens = run_emu3(ckpt, args, kwargs, concurrencies)
    result["environment"]["VLLM_USE_V2_MODEL_RUNNER"] = result["emu3_vllm"]["model_runner"]
    if not args.skip_peer:
        result["plain_vllm"] = run_plain(ckpt, kwargs, rows, n_tokens, concurrencies, args.top_k,
                                         args.repeats)
    if not args.skip_hf:
        result["transformers"] = run_transformers(ckpt, args, rows, n_tokens)

    ours = result["emu3_vllm"]["by_concurrency"][-1]
    ratios, targets = {}, {}
    if "plain_vllm" in result:
        plain = result["plain_vllm"]
        ratios["emu3_vllm_over_plain_vllm"] = ours["images_per_s"] / plain["by_concurrency"][-1]["images_per_s"]
        ratios["emu3_vllm_over_plain_vllm_top_k_sampling"] = (
            ours["images_per_s"] / plain["top_k_sampling_at_max_concurrency"]["images_per_s"])
        targets["emu3_vllm >= 0.9 x plain vLLM (greedy)"] = ratios["emu3_vllm_over_plain_vllm"] >= 0.9
    if "transformers" in result:
        ratios["emu3_vllm_over_transformers"] = ours["images_per_s"] / result["transformers"]["images_per_s"]
        targets["emu3_vllm >= 12 x transformers"] = ratios["emu3_vllm_over_transformers"] >= 12
    if args.size == "8b" and not args.checkpoint and (h, w) == (90, 90):
        targets["<= 4 s per 720x720 image"] = 1 / ours["images_per_s"] <= 4.0
    result["seconds_per_image"] = 1 / ours["images_per_s"]
    result["ratios"], result["targets_met"] = ratios, targets

    print()
    rows_out = [["emu3_vllm", ours["images"], ours["images_per_s"], ours["image_tokens_per_s"],
                 1 / ours["images_per_s"], result["emu3_vllm"]["peak_memory_gib"]]]
    if "plain_vllm" in result:
        b = result["plain_vllm"]["by_concurrency"][-1]
        rows_out.append(["plain vLLM greedy (ceiling)", b["images"], b["images_per_s"], b["image_tokens_per_s"],
                         1 / b["images_per_s"], result["plain_vllm"]["peak_memory_gib"]])
        b = result["plain_vllm"]["top_k_sampling_at_max_concurrency"]
        rows_out.append(["plain vLLM top-k sampling", b["images"], b["images_per_s"], b["image_tokens_per_s"],
                         1 / b["images_per_s"], result["plain_vllm"]["peak_memory_gib"]])
    if "transformers" in result:
        c = result["transformers"]
        label = "transformers b=1" + (" (extrapolated)" if c["extrapolated"] else "")
        rows_out.append([label, 1, c["images_per_s"], c["tokens_per_s"], c["seconds_per_image"], c["peak_memory_gib"]])
    _common.print_table(["contender", "concurrency", "images/s", "image tokens/s", "s/image", "peak GiB"], rows_out)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")

    _common.write_json(args.out, result)
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot:
        series = {"emu3_vllm": [(r["images"], r["images_per_s"]) for r in result["emu3_vllm"]["by_concurrency"]]}
        if "plain_vllm" in result:
            series["plain vLLM greedy, 2 rows per image"] = [(r["images"], r["images_per_s"])
                                                     for r in result["plain_vllm"]["by_concurrency"]]
        hlines = {"transformers, batch 1": result["transformers"]["images_per_s"]} if "transformers" in result else {}
        _common.plot_lines(plot, f"Emu3 CFG generation, {h * 8}x{w * 8}, {result['environment'].get('gpu', 'CPU')}",
                           "images submitted at once", "images/s", series, hlines)
    return result


if __name__ == "__main__":
    main()
