"""`emu3-vllm` command line: make checkpoints, answer questions about images, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parse_override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cpu_defaults() -> None:
    # Without a GPU, vLLM reserves VLLM_CPU_KVCACHE_SPACE GiB of KV cache (default 4); tiny models need far less.
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def cmd_make_checkpoint(args) -> int:
    from .checkpoints import make_random_checkpoint

    overrides = dict(args.set or [])
    path = make_random_checkpoint(args.dir, size=args.size, seed=args.seed, dtype=args.dtype,
                                  write_weights=not args.no_weights, **overrides)
    print(f"wrote a random-weight Emu3 checkpoint ({args.size}) to {path}")
    return 0


def _engine(args):
    from .api import Emu3

    kwargs = {"dtype": args.dtype}
    for name in ("max_model_len", "tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    return Emu3(args.model, seed=args.seed, **kwargs)


def _print_answers(items, answers) -> int:
    failed = 0
    for i, (item, answer) in enumerate(zip(items, answers)):
        text = item if isinstance(item, str) else item.get("text", "")
        record = {"index": i, "question": text, "answer": str(answer)}
        if answer.error:
            record["error"] = answer.error
            failed += 1
        print(json.dumps(record, ensure_ascii=False))
    return 1 if failed == len(answers) and answers else 0


def _read_items(args) -> list:
    items = []
    if args.prompts_file:
        with open(args.prompts_file) as fh:
            for line in fh:
                if line.strip():
                    items.append(json.loads(line))
    if args.prompt is not None:
        items.append({"text": args.prompt, "images": args.image or []})
    if not items:
        raise SystemExit("nothing to answer: give --prompt TEXT [--image PATH ...] or --prompts-file FILE.jsonl")
    return items


def cmd_understand(args) -> int:
    _cpu_defaults()
    items = _read_items(args)
    engine = _engine(args)
    try:
        answers = engine.understand(items, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    finally:
        engine.close()
    return _print_answers(items, answers)


def cmd_generate(args) -> int:
    from .batch_io import generate_to_dir, read_prompts

    _cpu_defaults()
    prompts = read_prompts(args.prompts)
    engine = _engine(args)
    try:
        kwargs = dict(height=args.height, width=args.width, cfg_scale=args.cfg_scale, top_k=args.top_k,
                      temperature=args.temperature)
        if args.negative_prompt is not None:
            kwargs["negative_prompt"] = args.negative_prompt
        stats = generate_to_dir(engine, prompts, args.out, batch=args.batch, seed=args.seed, **kwargs)
    finally:
        engine.close()
    print(json.dumps({"out": args.out, **stats}))
    return 1 if stats["failed"] and not stats["written"] and not stats["skipped"] else 0


def cmd_demo(args) -> int:
    """Build the tiny checkpoint (once), answer a few questions with it and generate a few images to disk."""
    import numpy as np
    from PIL import Image

    from .checkpoints import make_random_checkpoint

    _cpu_defaults()
    out = Path(args.out)
    ckpt = out / "tiny-emu3"
    if not (ckpt / "config.json").exists():
        print(f"building the tiny random-weight Emu3 checkpoint in {ckpt} ...", file=sys.stderr)
        make_random_checkpoint(ckpt, size="tiny", seed=0)
    rng = np.random.default_rng(0)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (h, w) in {"square.png": (48, 48), "wide.png": (40, 72), "tall.png": (64, 32)}.items():
        path = images_dir / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    items = [
        {"text": "Describe a cat in one sentence.", "images": []},
        {"text": "What is in this picture?", "images": [paths[0]]},
        {"text": "Compare <image> with <image>", "images": [paths[1], paths[2]]},
    ]
    args.model = str(ckpt)
    engine = _engine(args)
    try:
        answers = engine.understand(items, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        code = _print_answers(items, answers)
        from .batch_io import generate_to_dir

        prompts = ["a red emu in the desert", "a city skyline at night", "a bowl of fruit", "a snowy mountain"]
        stats = generate_to_dir(engine, prompts, out / "generated", batch=len(prompts), height=64, width=64)
    finally:
        engine.close()
    print(json.dumps({"generated_images": str(out / "generated"), **stats}))
    print("(random weights: answers and images are noise; the point is the pipeline)", file=sys.stderr)
    return code


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="model dtype for vLLM (auto, bfloat16, float32, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", dest="max_model_len", type=int)
    p.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int)
    p.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float)
    p.add_argument("--max-num-seqs", dest="max_num_seqs", type=int)
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs / compilation")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emu3-vllm", description="BAAI Emu3 on vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write a random-weight Emu3 checkpoint")
    p.add_argument("dir")
    p.add_argument("--size", choices=["tiny", "small", "8b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE",
                   help="config override, e.g. --set hidden_size=256 --set codebook_size=1024")
    p.add_argument("--no-weights", action="store_true", help="write config, tokenizer and processor only")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("understand", help="answer questions about images (JSON lines out)")
    p.add_argument("--model", required=True, help="Emu3 checkpoint directory")
    p.add_argument("--prompt", help="question text")
    p.add_argument("--image", action="append", help="image path (repeat for several images)")
    p.add_argument("--prompts-file", help='JSON lines: {"text": ..., "images": [paths]}')
    _add_engine_args(p)
    p.set_defaults(func=cmd_understand)

    p = sub.add_parser("generate", help="text to image with CFG: PNGs + manifest.jsonl, resumable")
    p.add_argument("--model", required=True, help="Emu3 (Gen) checkpoint directory")
    p.add_argument("--prompts", required=True, help="a prompt, a text file (one per line) or a .jsonl file")
    p.add_argument("--out", required=True, help="output folder; re-running skips images already written")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=3.0)
    p.add_argument("--top-k", dest="top_k", type=int, default=2048)
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--batch", type=int, default=64, help="images per engine call (written after each)")
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate, temperature=1.0)

    p = sub.add_parser("demo", help="build the tiny checkpoint, answer questions and generate images with it")
    p.add_argument("--out", default="out", help="where the checkpoint and demo images go")
    _add_engine_args(p)
    p.set_defaults(func=cmd_demo, dtype="float32", max_new_tokens=16, enforce_eager=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
