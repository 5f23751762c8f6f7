"""Text-to-image throughput end to end, in one run on one checkpoint, with a KV cache that holds only part of the job.

    python benchmarks/bench_generation.py --size small --num-images 96 --height 64 --width 64 \
        --out benchmarks/results/generation_cpu_small.json        # also writes generation_cpu_small.png

(a)  stream       `Emu3.iter_images` over all images, the engine kept full by the streaming core; codes only, so
                  this is the in-engine rate, comparable with (d).
(a') stream+VQ    the same with VQ decode on its background thread, overlapping the engine's steps.
(b)  cli          `emu3-vllm generate`: PNGs and manifest written to disk as each image finishes (its own process;
                  the rate is over the streaming phase it reports, engine start excluded).
(c)  chunked      the path before streaming: chunks of --chunk images, each generated to completion (the engine
                  drains at every chunk boundary) and then VQ-decoded while the engine idles. Reported with and
                  without its decode time.
(d)  plain vLLM   the same cond and uncond rows decoding the same token counts with vLLM's stock scheduler and no
                  processor, all submitted at once, greedy: the ceiling for (a).
(e)  transformers `generate` with CFG and Emu3's layout, batch 1 (how Emu3 runs without vLLM); --skip-hf leaves it out.

With `--kv-cache-dtype fp8` the run is a KV-cache comparison instead: the streaming core (a) on an engine whose
KV cache is the model's dtype ("auto") and on one with an fp8 cache of the same bytes (so with as many more
blocks as the model dtype is wider than a byte: 2x for bfloat16, 4x for float32), reporting pairs per step (what
the cache holds at once) and images/s (where compute may bind before the cache does) of each:

    python benchmarks/bench_generation.py --size small --dtype bfloat16 --num-images 96 --height 128 --width 128 \
        --kv-cache-dtype fp8 --out benchmarks/results/generation_cpu_small_fp8_128.json

All vLLM contenders get the same engine arguments, KV cache (`num_gpu_blocks_override`, sized so about
--kv-fraction of the images fit at once), dtype and threads. Each vLLM measurement is the fastest of --repeats
runs with fresh prompts (only the shared negative prompt is meant to hit the prefix cache). Reported per
contender: images/s, the mean number of pairs decoding per engine step, and the share of wall time spent in VQ
decode. Prints a table, writes JSON (--out) and a matplotlib bar chart beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PROMPT_SUBJECTS = ["a red emu", "a lighthouse at dawn", "a bowl of ramen", "a snowy forest", "a city at night",
                   "a watercolor fox", "an old sailing ship", "a mountain lake"]


def prompts(n: int, take: int = 0) -> list[str]:
    """n distinct prompts; another `take` gives other prompts, so no timed run reuses an earlier run's prefix
    cache (only the shared negative prompt is meant to be cached)."""
    return [f"{PROMPT_SUBJECTS[i % len(PROMPT_SUBJECTS)]}, picture {i}, take {take}" for i in range(n)]


def kv_blocks_for(ckpt: str, args, block_size: int) -> tuple[int, int]:
    """(KV blocks so that about `kv_fraction` of the images' pairs fit at once, blocks one pair needs)."""
    from transformers import Emu3Processor

    from emu3_vllm.cfg_pairs import ImageSpec, PromptTokens, pair_prompts
    from emu3_vllm.layout import num_image_tokens, pixels_to_grid
    from emu3_vllm.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX

    tok = Emu3Processor.from_pretrained(ckpt).tokenizer
    h, w = pixels_to_grid(args.height, args.width)
    n = num_image_tokens(h, w)
    longest = max(prompts(args.num_images, 10_000), key=len)
    spec = ImageSpec(longest, h, w, args.cfg_scale, 0, NEGATIVE_PROMPT, POSITIVE_SUFFIX, args.top_k, 1.0)
    pair = pair_prompts(spec, PromptTokens.from_tokenizer(tok))
    cond, uncond = (len(tok.encode(t, add_special_tokens=False)) for t in pair)
    per_pair = math.ceil((cond + n) / block_size) + math.ceil((uncond + n) / block_size)
    fit = max(1, round(args.num_images * args.kv_fraction))
    return fit * per_pair, per_pair


def summary(label, images, seconds, *, mean_pairs=None, decode_seconds=0.0, extra=None):
    out = {"images": images, "seconds": round(seconds, 4), "images_per_s": images / seconds,
           "mean_pairs_per_step": round(mean_pairs, 2) if mean_pairs else None,
           "decode_share": round(decode_seconds / seconds, 3), **(extra or {})}
    pairs = f"{mean_pairs:6.2f}" if mean_pairs else "     -"
    print(f"{label:22s} {images:4d} images: {seconds:8.3f} s  {images / seconds:7.3f} images/s  pairs/step {pairs}  "
          f"decode share {out['decode_share']:.2f}", flush=True)
    return out


def best(runs: list[dict]) -> dict:
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "seconds_all": [r["seconds"] for r in runs]}


def generation_args(args) -> dict:
    return dict(height=args.height, width=args.width, cfg_scale=args.cfg_scale, top_k=args.top_k)


def stream_once(engine, args, take: int, decode: bool, label: str) -> dict:
    """One timed run of the streaming core over all the images, the window as large as the job."""
    from emu3_vllm.offline.image_stream import StreamStats

    stats = StreamStats()
    with _common.timed() as t:
        failed = sum(bool(r.error) for _, r in engine.iter_images(
            prompts(args.num_images, take), seed=1000, decode=decode, max_in_flight=args.num_images, stats=stats,
            **generation_args(args)))
    return summary(label, args.num_images, t["seconds"], mean_pairs=stats.mean_pairs_per_step,
                   decode_seconds=stats.decode_seconds, extra={"failed": failed})


def run_emu3(ckpt, args, kwargs):
    """(a), (a') and (c) on one engine, which is returned open for the head-to-head with (d)."""
    from emu3_vllm import Emu3
    from emu3_vllm.offline.image_stream import StreamStats
    from emu3_vllm.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX

    gen = generation_args(args)
    out, take = {}, 0
    with _common.PeakMemory() as mem:
        with _common.timed() as start:
            engine = Emu3(ckpt, **kwargs)
        out["engine_start_s"] = round(start["seconds"], 2)
        out["model_runner"] = "v2" if engine.uses_v2_runner else "v1"
        engine.generate_images(prompts(4, take=-1), seed=0, use_tqdm=False, **gen)  # warm-up, VQ decoder loaded

        def stream(decode: bool, label: str):
            nonlocal take
            runs = []
            for _ in range(args.repeats):
                take += 1
                runs.append(stream_once(engine, args, take, decode, label))
            return best(runs)

        out["stream"] = stream(False, "(a) stream")
        out["stream_with_decode"] = stream(True, "(a') stream + VQ")
        runs = []
        for _ in range(args.repeats):
            take += 1
            texts = prompts(args.num_images, take)
            steps = tokens = 0
            decode_s = 0.0
            with _common.timed() as t:
                for start_i in range(0, args.num_images, args.chunk):
                    stats = StreamStats()
                    chunk = dict(engine.iter_images(texts[start_i:start_i + args.chunk], seed=1000 + start_i,
                                                    decode=False, max_in_flight=args.chunk, stats=stats, **gen))
                    steps, tokens = steps + stats.engine_steps, tokens + stats.image_tokens
                    with _common.timed() as d:
                        engine.decode_images([r.codes for r in chunk.values() if r.codes is not None])
                    decode_s += d["seconds"]
            runs.append(summary("(c) chunked", args.num_images, t["seconds"], mean_pairs=tokens / steps,
                                decode_seconds=decode_s,
                                extra={"images_per_s_without_decode": args.num_images / (t["seconds"] - decode_s)}))
        out["chunked"] = best(runs)
        # Fresh prompt texts (same lengths) for the other contenders, one take per run.
        prompt_rows = {t: [engine.image_generation_prompts(p, *engine_grid(args), NEGATIVE_PROMPT, POSITIVE_SUFFIX)
                           for p in prompts(args.num_images, t)] for t in range(take + 1, take + 2 + args.repeats)}
    out["peak_memory_gib"] = mem.gib
    return out, prompt_rows, engine


def run_kv_comparison(ckpt, args, kwargs, result: dict, threads: int) -> dict:
    """(a) on a model-dtype KV cache and on an fp8 one of the same bytes, one engine after the other."""
    import torch

    from emu3_vllm import Emu3

    dtype = kwargs.get("dtype", "auto")
    width = torch.empty((), dtype=getattr(torch, dtype) if dtype != "auto" else torch.bfloat16).element_size()
    blocks = kwargs["num_gpu_blocks_override"]
    per_pair = result["kv_cache"]["blocks_per_pair"]
    runs = {}
    for kv_dtype, kv_blocks in (("auto", blocks), (args.kv_cache_dtype, blocks * width)):
        engine = Emu3(ckpt, **{**kwargs, "kv_cache_dtype": kv_dtype, "num_gpu_blocks_override": kv_blocks})
        try:
            engine.generate_images(prompts(4, take=-1), seed=0, use_tqdm=False, decode=False,
                                   **generation_args(args))  # warm-up
            best_run = best([stream_once(engine, args, take, False, f"(a) stream, KV {kv_dtype}")
                             for take in range(1, args.repeats + 1)])
        finally:
            engine.close()
        runs[kv_dtype] = {**best_run, "kv_blocks": kv_blocks, "pairs_that_fit": kv_blocks // per_pair}
    auto, fp8 = runs["auto"], runs[args.kv_cache_dtype]
    result["kv_cache_comparison"] = {
        "model_dtype": dtype, "bytes_per_element": {"auto": width, args.kv_cache_dtype: 1}, "runs": runs,
        "pairs_per_step_ratio": fp8["mean_pairs_per_step"] / auto["mean_pairs_per_step"],
        "images_per_s_ratio": fp8["images_per_s"] / auto["images_per_s"]}
    comparison = result["kv_cache_comparison"]
    result["targets_met"] = {f"{args.kv_cache_dtype} >= 1.8 x the pairs per step of auto at the same KV bytes":
                             comparison["pairs_per_step_ratio"] >= 1.8}
    print()
    _common.print_table(["KV cache", "blocks", "pairs that fit", "pairs/step", "images/s"],
                        [[name, run["kv_blocks"], run["pairs_that_fit"], run["mean_pairs_per_step"],
                          run["images_per_s"]] for name, run in runs.items()])
    print(f"pairs per step: {comparison['pairs_per_step_ratio']:.2f}x; images/s: "
          f"{comparison['images_per_s_ratio']:.2f}x")
    for name, met in result["targets_met"].items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    _common.write_json(args.out, result)
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot:
        h, w = engine_grid(args)
        where = result["environment"].get("gpu", f"CPU, {threads} threads")
        _common.plot_bars(plot, f"Emu3 CFG generation, KV cache at equal bytes: {args.num_images} images of "
                                f"{h * 8}x{w * 8}, {dtype} model ({where})", "images/s",
                          {f"KV {name}": run["images_per_s"] for name, run in runs.items()},
                          notes={f"KV {name}": f"{run['mean_pairs_per_step']} pairs/step"
                                 for name, run in runs.items()})
    return result


def engine_grid(args) -> tuple[int, int]:
    from emu3_vllm.layout import pixels_to_grid

    return pixels_to_grid(args.height, args.width)


def run_cli(ckpt, args, kwargs, workdir: Path) -> dict:
    """(b): the CLI in its own process, as a user runs it; its summary line reports the streaming phase."""
    flags = ["--dtype", kwargs["dtype"], "--max-num-seqs", str(kwargs["max_num_seqs"]),
             "--max-model-len", str(kwargs["max_model_len"]), "--max-in-flight", str(args.num_images),
             "--height", str(args.height), "--width", str(args.width), "--cfg-scale", str(args.cfg_scale),
             "--top-k", str(args.top_k), "--seed", "1000", "--no-progress"]
    if kwargs.get("enforce_eager"):
        flags.append("--enforce-eager")
    for key in ("num_gpu_blocks_override", "block_size", "gpu_memory_utilization"):
        if key in kwargs:
            flags += ["--engine-arg", f"{key}={json.dumps(kwargs[key])}"]
    runs = []
    for repeat in range(args.repeats):
        prompt_file = workdir / f"cli_prompts_{repeat}.txt"
        prompt_file.write_text("\n".join(prompts(args.num_images, 500 + repeat)) + "\n")
        out_dir = workdir / f"cli_out_{repeat}"
        proc = subprocess.run([sys.executable, "-m", "emu3_vllm.cli", "generate", "--model", ckpt, "--prompts",
                               str(prompt_file), "--out", str(out_dir), *flags], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emu3-vllm generate failed ({proc.returncode}): {proc.stderr[-3000:]}")
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(summary("(b) cli, PNGs on disk", stats["written"], stats["seconds"],
                            mean_pairs=stats["mean_pairs_per_step"], decode_seconds=stats["decode_seconds"],
                            extra={"failed": stats["failed"],
                                   "png_bytes": sum(p.stat().st_size for p in out_dir.glob("*.png"))}))
    return best(runs)


def _tokens_per_image(args) -> int:
    from emu3_vllm.layout import num_image_tokens

    return num_image_tokens(*engine_grid(args))


def run_plain(ckpt, kwargs, rows, n_tokens, repeats, rival=None):
    """(d): stock vLLM decoding the same rows, stepped by hand to count engine steps. With `rival` (one run of
    (a), returning its summary), each (d) run follows an (a) run: the head-to-head ratios then compare runs made
    a few seconds apart, not minutes apart on a machine whose speed drifts."""
    from vllm import LLM, SamplingParams

    from emu3_vllm.engine import shutdown_llm

    kwargs = {k: v for k, v in kwargs.items() if k not in ("logits_processors", "scheduler_cls")}
    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, min_tokens=n_tokens, ignore_eos=True)
    out, runs, takes = {}, [], iter(sorted(rows))
    with _common.PeakMemory() as mem:
        with _common.timed() as start:
            llm = LLM(model=ckpt, **kwargs)
        out["engine_start_s"] = round(start["seconds"], 2)
        llm.generate([t for pair in rows[next(takes)][:4] for t in pair], params, use_tqdm=False)  # warm-up
        head_to_head = []
        for _ in range(repeats):
            texts = [t for pair in rows[next(takes)] for t in pair]
            ours = rival() if rival else None
            steps = 0
            with _common.timed() as t:
                llm.enqueue(texts, params, use_tqdm=False)
                while llm.llm_engine.has_unfinished_requests():
                    llm.llm_engine.step()
                    steps += 1
            runs.append(summary("(d) plain vLLM", len(texts) // 2, t["seconds"],
                                mean_pairs=len(texts) // 2 * n_tokens / steps))
            if ours:
                head_to_head.append(round(ours["images_per_s"] / runs[-1]["images_per_s"], 4))
        shutdown_llm(llm)
    out.update(best(runs))
    if head_to_head:
        out["stream_over_plain_vllm_each_round"] = head_to_head
    out["peak_memory_gib"] = mem.gib
    return out


def run_transformers(ckpt, args, rows, n_tokens):
    """(e): transformers' batch-1 CFG generate (--hf-max-tokens measures fewer tokens and extrapolates)."""
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    from emu3_vllm.layout import ImageTokenIds
    from emu3_vllm.testing.hf_reference import hf_generate_image_tokens

    dtype = getattr(torch, args.dtype or ("bfloat16" if _common.has_cuda() else "float32"))
    device = "cuda" if _common.has_cuda() else "cpu"
    model = Emu3ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    tok = Emu3Processor.from_pretrained(ckpt).tokenizer
    ids = ImageTokenIds.from_tokenizer(tok)
    h, w = engine_grid(args)
    measure = min(n_tokens, args.hf_max_tokens) if args.hf_max_tokens else n_tokens
    gen = dict(do_sample=True, top_k=args.top_k, max_new_tokens=measure)
    pairs = rows[max(rows)]
    hf_generate_image_tokens(model, tok, *pairs[0], h, w, args.cfg_scale, ids, **{**gen, "max_new_tokens": 4})
    rates = []
    for cond, uncond in pairs[1:1 + args.hf_images]:
        torch.manual_seed(0)
        with _common.timed() as t:
            n = len(hf_generate_image_tokens(model, tok, cond, uncond, h, w, args.cfg_scale, ids, **gen))
        rates.append(n / t["seconds"])
    tok_s = max(rates)
    print(f"(e) transformers b=1    {tok_s:.2f} tokens/s -> {tok_s / n_tokens:.3f} images/s", flush=True)
    return {"images_measured": len(rates), "tokens_per_s": tok_s, "images_per_s": tok_s / n_tokens,
            "tokens_per_s_each": [round(r, 3) for r in rates], "extrapolated": measure < n_tokens, "batch_size": 1}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=2048)
    parser.add_argument("--kv-fraction", type=float, default=0.3,
                        help="size the KV cache so about this share of the images' pairs fit at once")
    parser.add_argument("--chunk", type=int, default=64, help="images per call in the chunked path (c)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (the fastest is reported)")
    parser.add_argument("--hf-images", type=int, default=3, help="images transformers generates one at a time")
    parser.add_argument("--hf-max-tokens", type=int, default=None,
                        help="stop transformers after this many tokens per image and extrapolate")
    parser.add_argument("--skip-cli", action="store_true", help="leave out (b)")
    parser.add_argument("--kv-cache-dtype", choices=["fp8"], default=None,
                        help="compare the streaming core on an fp8 KV cache with the model-dtype one, at equal bytes")
    parser.add_argument("--plot", help="PNG bar chart (default: beside --out)")
    args = parser.parse_args(argv)

    threads = _common.configure_threads(args.threads)
    ckpt = _common.checkpoint(args)
    n_tokens = _tokens_per_image(args)
    block_size = 32
    blocks, per_pair = kv_blocks_for(ckpt, args, block_size)
    max_len = min(512 + n_tokens, _common.max_positions(ckpt))
    kwargs = _common.engine_args(args, max_num_seqs=2 * args.num_images, max_model_len=max_len,
                                 block_size=block_size, num_gpu_blocks_override=blocks)
    h, w = engine_grid(args)
    result = {"benchmark": "generation", "size": None if args.checkpoint else args.size, "checkpoint": ckpt,
              "decoder_parameters": _common.count_parameters(ckpt), "num_images": args.num_images,
              "image": {"height": h * 8, "width": w * 8, "grid": [h, w], "tokens_per_image": n_tokens},
              "cfg_scale": args.cfg_scale, "top_k": args.top_k, "chunk": args.chunk,
              "kv_cache": {"blocks": blocks, "block_size": block_size, "blocks_per_pair": per_pair,
                           "pairs_that_fit": blocks // per_pair},
              "engine_args": kwargs, "environment": _common.environment(threads)}

    if args.kv_cache_dtype:
        return run_kv_comparison(ckpt, args, kwargs, result, threads)
    emu3, rows, engine = run_emu3(ckpt, args, kwargs)
    result["emu3_vllm"] = emu3
    result["environment"]["VLLM_USE_V2_MODEL_RUNNER"] = emu3["model_runner"]
    if not args.skip_cli:
        with tempfile.TemporaryDirectory(prefix="emu3_bench_cli_", dir=args.workdir) as tmp:
            result["cli"] = run_cli(ckpt, args, kwargs, Path(tmp))
    if not args.skip_peer:
        takes = iter(range(10_000, 20_000))
        result["plain_vllm"] = run_plain(
            ckpt, kwargs, rows, n_tokens, args.repeats,
            rival=lambda: stream_once(engine, args, next(takes), False, "(a) stream, head-to-head"))
    engine.close()
    if not args.skip_hf:
        result["transformers"] = run_transformers(ckpt, args, rows, n_tokens)

    rate = {"(a) stream": emu3["stream"]["images_per_s"],
            "(a') stream + VQ": emu3["stream_with_decode"]["images_per_s"],
            "(c) chunked": emu3["chunked"]["images_per_s"]}
    ratios = {"stream_over_chunked": rate["(a) stream"] / rate["(c) chunked"],
              "stream_over_chunked_without_decode": rate["(a) stream"] / emu3["chunked"]["images_per_s_without_decode"]}
    targets = {"(a) stream > (c) chunked": rate["(a) stream"] > rate["(c) chunked"]}
    if "cli" in result:
        rate["(b) cli"] = result["cli"]["images_per_s"]
        ratios["cli_over_stream"] = rate["(b) cli"] / rate["(a) stream"]
        if _common.has_cuda():
            targets["(b) cli >= 0.9 x (a) stream (GPU)"] = ratios["cli_over_stream"] >= 0.9
    if "plain_vllm" in result:
        rate["(d) plain vLLM"] = result["plain_vllm"]["images_per_s"]
        ratios["stream_over_plain_vllm"] = rate["(a) stream"] / rate["(d) plain vLLM"]
        # The target is judged on the runs made back to back (median round), not on bests minutes apart.
        ratios["stream_over_plain_vllm_head_to_head"] = statistics.median(
            result["plain_vllm"]["stream_over_plain_vllm_each_round"])
        targets["(a) stream >= 0.95 x (d) plain vLLM"] = ratios["stream_over_plain_vllm_head_to_head"] >= 0.95
    if "transformers" in result:
        rate["(e) transformers"] = result["transformers"]["images_per_s"]
        ratios["stream_over_transformers"] = rate["(a) stream"] / rate["(e) transformers"]
    result["images_per_s"], result["ratios"], result["targets_met"] = rate, ratios, targets

    print()
    table = []
    for label, key, source in (("(a) stream", "stream", emu3), ("(a') stream + VQ", "stream_with_decode", emu3),
                               ("(b) cli, PNGs on disk", None, result.get("cli")),
                               ("(c) chunked", "chunked", emu3), ("(d) plain vLLM", None, result.get("plain_vllm"))):
        entry = source.get(key) if key and source else source
        if entry:
            table.append([label, entry["images_per_s"], entry["mean_pairs_per_step"] or "-", entry["decode_share"]])
    if "transformers" in result:
        table.append(["(e) transformers b=1", result["transformers"]["images_per_s"], 1, "-"])
    _common.print_table(["contender", "images/s", "pairs/step", "decode share"], table)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")

    _common.write_json(args.out, result)
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot:
        where = result["environment"].get("gpu", f"CPU, {threads} threads")
        _common.plot_bars(plot, f"Emu3 CFG generation: {args.num_images} images of {h * 8}x{w * 8}, "
                                f"KV cache for ~{blocks // per_pair} pairs ({where})",
                          "images/s", {label: row[1] for label, row in zip([r[0] for r in table], table)},
                          notes={row[0]: f"{row[2]} pairs/step" for row in table if row[2] not in ("-", 1)})
    return result


if __name__ == "__main__":
    main()
