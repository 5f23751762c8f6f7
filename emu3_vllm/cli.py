"""`emu3-vllm` command line: make checkpoints, answer questions about images, generate images, run the demo.

Results go to stdout (JSON lines), everything else (vLLM's log, progress bars, warnings) to stderr, so
`emu3-vllm understand ... > answers.jsonl` is clean. Exit codes: 0 every item done; 1 some items failed (each
failure is in the output, naming its item); 2 a usage or input error found before any work started; 130
interrupted (Ctrl-C), with everything finished so far kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

from emu3_vllm.settings import (
    ENGINE_SEED_MAX,
    EngineSeed,
    Seed,
)
from emu3_vllm.vllm_plugin.registration import DIE_WITH_PARENT_ENV

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or input found before any work: one line to stderr, exit 2."""


# --------------------------------------------------------------------------------------------------------------
# Argument types


def int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= `minimum`; `expected` names what the error asks for ("a positive integer")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = int_at_least(1, "a positive integer")


def _float_above(minimum: float, inclusive: bool):
    """An argparse type: a finite float > `minimum` (or >= with `inclusive`)."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
        return value

    return parse


_positive_float = _float_above(0.0, inclusive=False)
_non_negative_float = _float_above(0.0, inclusive=True)


def _setting(field_type, kind: str = "integer"):
    """An argparse type from one of `settings`' field types: the command line takes the same values, with the same
    bounds, as a prompt file or an HTTP request."""
    from emu3_vllm import settings

    def parse(text: str):
        try:
            value = int(text) if kind == "integer" else float(text) if kind == "number" else text
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind == 'integer' else 'a number'}, got "
                                             f"{settings.show(text)}") from None
        try:
            return settings.check_value(field_type, value, "value")
        except settings.SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None

    return parse


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# --------------------------------------------------------------------------------------------------------------
# Shared plumbing


@contextlib.contextmanager
def _results_stream():
    """Yield a handle on the real stdout and send everything else written to fd 1, by this process and the engine
    processes it starts, to stderr: vLLM logs to stdout unless told otherwise."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    results = os.fdopen(saved, "w", buffering=1, encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield results
    finally:
        results.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        results.close()


def _engine(args):
    """The command's engine; engine arguments vLLM would refuse are a usage error, found before it starts."""
    from emu3_vllm.offline.emu3 import Emu3

    # `generate`'s --seed is its images' base seed: images depend on their own seeds alone, never the engine's.
    seed = 0 if args.command == "generate" else args.seed
    try:
        return Emu3(args.model, seed=seed, **_engine_kwargs(args))
    except (ValueError, TypeError) as exc:  # raised while vLLM checks its configuration, before any process starts
        raise UsageError(f"engine arguments: {str(exc).strip().splitlines()[0]}") from None


def _engine_kwargs(args) -> dict:
    kwargs = dict(args.engine_arg or [])
    kwargs["dtype"] = args.dtype
    for name in ("max_model_len", "tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs", "kv_cache_dtype"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    from emu3_vllm.engine import check_engine_kwargs, check_kv_cache

    try:
        kwargs = check_engine_kwargs(kwargs)
    except ValueError as exc:
        raise UsageError(f"--engine-arg {exc}") from None
    try:
        check_kv_cache(args.model, kwargs.get("kv_cache_dtype"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return kwargs


def _check_model(args) -> None:
    from emu3_vllm.offline.items import check_model

    try:
        check_model(args.model)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None


def _read_prompt_file(path: str) -> list:
    from emu3_vllm.jobs.prompt_source import PromptFileError, read_prompt_file

    try:
        return read_prompt_file(path)
    except PromptFileError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------------------------------------------
# Commands


def cmd_make_checkpoint(args) -> int:
    from emu3_vllm.shapes.trained import copy_shapes_checkpoint
    from emu3_vllm.testing.checkpoints import make_random_checkpoint

    if args.size == "shapes":  # the trained checkpoint that ships with the package, not a random one
        print(f"wrote the trained shapes Emu3 checkpoint to {copy_shapes_checkpoint(args.dir)}")
        return EXIT_OK
    overrides = dict(args.set or [])
    try:
        path = make_random_checkpoint(args.dir, size=args.size, seed=args.seed, dtype=args.dtype,
                                      write_weights=not args.no_weights, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote a random-weight Emu3 checkpoint ({args.size}) to {path}")
    return EXIT_OK


def _understanding_items(args) -> list:
    if args.prompts_file and args.prompt is not None:
        raise UsageError("give either --prompt (with --image) or --prompts-file, not both")
    if args.prompts_file:
        return _read_prompt_file(args.prompts_file)
    if args.prompt is not None:
        for image in args.image or []:
            if not Path(image).is_file():
                raise UsageError(f"--image {image}: no such file")
        return [{"text": args.prompt, "images": args.image or []}]
    raise UsageError("nothing to answer: give --prompt TEXT [--image PATH ...] or --prompts-file FILE.jsonl")


def _answer_records(items: list, answers: list) -> tuple[list[dict], int]:
    from emu3_vllm.offline.items import ItemError, understanding_item

    records, failed = [], 0
    for i, (raw, answer) in enumerate(zip(items, answers)):
        try:
            item = understanding_item(raw, f"item {i}")
            question, images = item.text, [str(img) for img in item.images]
        except ItemError:
            question, images = raw, []
        record = {"index": i, "question": question, "images": images, "answer": str(answer)}
        if answer.error:
            record["error"] = answer.error
            failed += 1
        records.append(record)
    return records, failed


def cmd_understand(args) -> int:
    items = _understanding_items(args)
    _check_model(args)
    with _results_stream() as out:
        engine = _engine(args)
        try:
            answers = engine.understand(items, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        finally:
            engine.close()
        records, failed = _answer_records(items, answers)
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    if failed:
        print(f"{failed} of {len(items)} items failed (see their \"error\")", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _generation_prompts(args):
    """The prompts of a `generate` run: a file is read lazily, again for each pass, never held whole."""
    if not args.prompts:
        return list(args.prompt)
    from emu3_vllm.jobs.prompt_source import PromptFile, PromptFileError

    try:
        return PromptFile(args.prompts)
    except PromptFileError as exc:
        raise UsageError(str(exc)) from None


def cmd_generate(args) -> int:
    """One generation job (prompts -> plan -> engine -> sink) into a folder of PNGs or webdataset shards, in this
    process or on Ray replicas."""
    import importlib.util

    from emu3_vllm.jobs.files import OutputError, WriteError
    from emu3_vllm.jobs.job import GenerationJob
    from emu3_vllm.jobs.prompt_source import PromptFileError
    from emu3_vllm.offline.items import GenerationDefaults

    shards = _shard_output(args)
    on_ray = args.replicas is not None or args.ray_address is not None
    if on_ray and importlib.util.find_spec("ray") is None:
        raise UsageError("--replicas runs on Ray, which is not installed: pip install 'emu3-vllm[ray]'")
    prompts = _generation_prompts(args)
    _check_model(args)
    defaults = GenerationDefaults(**{name: getattr(args, name) for name in GenerationDefaults.fields()})
    try:
        sink = _sink(args, shards)
        job = GenerationJob(prompts, sink, defaults.checked(), args.seed, regenerate_changed=args.regenerate_changed)
    except (OutputError, PromptFileError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    for note in job.plan.notes():
        print(note, file=sys.stderr)

    def report(index: int, result) -> None:
        if result.error:
            print(result.error, file=sys.stderr)

    unit = job.plan.unit
    code = EXIT_OK
    with _results_stream() as out:
        try:
            if on_ray:
                from emu3_vllm.jobs.ray_replicas import run_on_ray

                run_on_ray(job, args.model, replicas=args.replicas or 1, ray_address=args.ray_address,
                           tensor_parallel_size=args.tensor_parallel_size or 1,
                           cpus_per_replica=args.cpus_per_replica, engine_kwargs=_engine_kwargs(args),
                           max_in_flight=args.max_in_flight, progress=not args.no_progress)
            elif job.needs_engine:
                engine = _engine(args)
                try:
                    job.run(engine, max_in_flight=args.max_in_flight, progress=not args.no_progress,
                            on_result=report)
                finally:
                    engine.close()
            else:
                job.run(None, progress=not args.no_progress, on_result=report)
        except KeyboardInterrupt:
            lost = "images in flight were aborted" if unit == "image" else "shards in progress were dropped"
            print(f"interrupted: the {lost}; every finished {unit} is in the folder, and a re-run continues from "
                  "there", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except ConnectionError as exc:  # no Ray cluster there: nothing has started
            raise UsageError(str(exc).splitlines()[0]) from None
        except WriteError as exc:  # disk full, say: the folder is consistent, so this is a stop, not a crash
            job.stats["error"] = str(exc)
            print(f"emu3-vllm generate: error: {exc}; every finished {unit} is in the folder, and a re-run "
                  "continues from there", file=sys.stderr)
            code = EXIT_SOME_FAILED
        out.write(json.dumps(job.stats) + "\n")
    if code == EXIT_OK and job.stats["failed"]:
        where = "manifest lines" if unit == "image" else "manifest rows"
        print(f"{job.stats['failed']} of {job.stats['images']} images failed (their {where} say why)",
              file=sys.stderr)
        code = EXIT_SOME_FAILED
    return code


def _sink(args, shards: bool):
    if not shards:
        from emu3_vllm.jobs.image_folder import ImageFolderSink

        return ImageFolderSink(args.out, args.model)
    from emu3_vllm.jobs.webdataset import DEFAULT_SHARD_SIZE, WebdatasetSink

    return WebdatasetSink(args.out, args.model, shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
                          num_shards=args.num_shards or 1, shard_index=args.shard_index or 0)


def _shard_output(args) -> bool:
    """Whether this run writes webdataset shards: asked for, or implied by the options that need them."""
    scale_out = [flag for flag, given in (("--replicas", args.replicas is not None),
                                          ("--ray-address", args.ray_address is not None),
                                          ("--num-shards", args.num_shards is not None),
                                          ("--shard-index", args.shard_index is not None)) if given]
    if args.format == "folder" and scale_out:
        raise UsageError(f"{scale_out[0]} writes webdataset shards; use --format webdataset")
    if (args.num_shards is None) != (args.shard_index is None):
        raise UsageError("give --num-shards and --shard-index together")
    # Options that would be silently ignored are refused: the user meant something this run would not do.
    if args.cpus_per_replica is not None and args.replicas is None and args.ray_address is None:
        raise UsageError("--cpus-per-replica sizes Ray replicas; give it with --replicas or --ray-address")
    shards = args.format == "webdataset" or bool(scale_out)
    if args.shard_size is not None and not shards:
        raise UsageError("--shard-size cuts webdataset shards; add --format webdataset (a folder of PNGs has none)")
    return shards


def cmd_demo(args) -> int:
    """Answer questions about shape images and draw shapes with the trained shapes checkpoint."""
    from emu3_vllm.shapes.demo import run_demo
    from emu3_vllm.shapes.trained import shapes_checkpoint

    args.model = str(shapes_checkpoint())
    with _results_stream() as out_stream:
        engine = _engine(args)
        try:
            return run_demo(args.out, engine=engine, stdout=out_stream, max_new_tokens=args.max_new_tokens)
        finally:
            engine.close()


# --------------------------------------------------------------------------------------------------------------
# Parser


def _add_image_settings(p: argparse.ArgumentParser) -> None:
    """The options that set every image's settings, from the settings model: its types, bounds, defaults and help."""
    from emu3_vllm.settings import CALL_LEVEL, ImageSettings, field_kind, field_type

    kinds = {int: "integer", float: "number", str: "text"}
    for name in CALL_LEVEL:
        info = ImageSettings.model_fields[name]
        long_default = isinstance(info.default, str) and len(info.default) > 20
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=info.default,
                       type=_setting(field_type(name), kinds[field_kind(name)]),
                       help=info.description + ("" if long_default else " (default: %(default)s)"))
    p.add_argument("--seed", type=_setting(Seed), default=0, help="image i gets seed + i (a 64-bit integer)")


def _add_engine_args(p: argparse.ArgumentParser, answers: bool = True) -> None:
    """vLLM's engine options; with `answers`, also the engine seed and the text-sampling options."""
    p.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
                   help="model dtype for vLLM")
    if answers:
        p.add_argument("--seed", type=_setting(EngineSeed), default=0,
                       help=f"engine seed for sampled answers, 0 to {ENGINE_SEED_MAX}")
    p.add_argument("--max-model-len", dest="max_model_len", type=_positive_int)
    p.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=_positive_int)
    p.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=_positive_float)
    p.add_argument("--max-num-seqs", dest="max_num_seqs", type=_positive_int)
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs / compilation")
    p.add_argument("--kv-cache-dtype", dest="kv_cache_dtype",
                   help="vLLM's KV cache dtype: auto (the model's) or fp8, which holds twice the tokens")
    p.add_argument("--engine-arg", dest="engine_arg", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="any other vllm.LLM argument, e.g. --engine-arg num_gpu_blocks_override=64")
    if answers:
        p.add_argument("--max-new-tokens", dest="max_new_tokens", type=_positive_int, default=64)
        p.add_argument("--temperature", type=_non_negative_float, default=0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emu3-vllm", description="BAAI Emu3 on vLLM",
        epilog="exit codes: 0 all items done, 1 some items failed, 2 usage or input error, 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write an Emu3 checkpoint: random weights (tiny, small, 8b) or the "
                                               "trained shapes checkpoint (shapes)")
    p.add_argument("dir")
    p.add_argument("--size", choices=["tiny", "small", "8b", "shapes"], default="tiny",
                   help="shapes: copy the trained shapes checkpoint that ships with the package")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--set", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="config override, e.g. --set hidden_size=256 --set codebook_size=1024")
    p.add_argument("--no-weights", action="store_true", help="write config, tokenizer and processor only")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("understand", help="answer questions about images (JSON lines on stdout)")
    p.add_argument("--model", required=True, help="Emu3 checkpoint directory")
    p.add_argument("--prompt", help="question text")
    p.add_argument("--image", action="append", help="image path (repeat for several images)")
    p.add_argument("--prompts-file", "--prompts", dest="prompts_file",
                   help='JSON lines: {"text": ..., "images": [paths]}, ["text", [paths]] or "text" per line')
    _add_engine_args(p)
    p.set_defaults(func=cmd_understand)

    p = sub.add_parser("generate", help="text to image with CFG into a folder: PNGs + manifest.jsonl, resumable")
    p.add_argument("--model", required=True, help="Emu3 (Gen) checkpoint directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts", metavar="FILE",
                        help='a text file (one prompt a line), .jsonl ({"prompt": ..., "seed": ...} a line) or '
                             '.parquet (a prompt column, optional seed, height, width, cfg_scale, negative_prompt)')
    p.add_argument("--out", required=True, help="output folder; a re-run skips the images already there")
    _add_image_settings(p)
    p.add_argument("--max-in-flight", "--batch", dest="max_in_flight", type=_positive_int, default=None,
                   help="images submitted to the engine at once (default: the engine's max_num_seqs)")
    p.add_argument("--regenerate-changed", action="store_true",
                   help="replace images in --out that were made with other settings (else: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = p.add_argument_group("large jobs (webdataset shards; see the README's \"Scaling out\")")
    scale.add_argument("--format", choices=["folder", "webdataset"], default=None,
                       help="folder: PNGs + manifest.jsonl (default); webdataset: {shard:05d}.tar + .parquet + "
                            "_stats.json per shard (default with the options below)")
    scale.add_argument("--shard-size", dest="shard_size", type=_positive_int, default=None,
                       help="images per shard, the unit of work and of resume (default 1000)")
    scale.add_argument("--replicas", type=_positive_int, help="data-parallel engines on a Ray cluster")
    scale.add_argument("--ray-address", dest="ray_address",
                       help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    scale.add_argument("--cpus-per-replica", dest="cpus_per_replica", type=_positive_float,
                       help="Ray CPUs each replica reserves (default: 1 with GPUs; a share of a CPU without)")
    scale.add_argument("--num-shards", dest="num_shards", type=_positive_int,
                       help="with --shard-index: this process makes only the shards s with s %% S == i")
    scale.add_argument("--shard-index", dest="shard_index", type=int, metavar="I")
    _add_engine_args(p, answers=False)
    p.set_defaults(func=cmd_generate)

    # Handled by `serving.launcher.main` before this parser runs (every vllm serve flag passes through); listed
    # for --help.
    sub.add_parser("serve", add_help=False,
                   help="vLLM's OpenAI server for Emu3 (chat, completions, /v1/images/generations): "
                        "emu3-vllm serve MODEL [any vllm serve flag]")

    p = sub.add_parser("demo", help="answer questions about shapes and draw them with the trained shapes checkpoint")
    p.add_argument("--out", default="out", help="where the demo's images and contact sheet go")
    _add_engine_args(p)
    p.set_defaults(func=cmd_demo, dtype="float32", max_new_tokens=32, enforce_eager=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Keep stdout for results: vLLM (here and in its engine processes) logs to stdout unless told otherwise.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # A killed emu3-vllm takes its engine processes with it (a re-run then finds the GPU free).
    os.environ.setdefault(DIE_WITH_PARENT_ENV, "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from emu3_vllm.serving.launcher import main as serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    ctrl_c = _remember_ctrl_c()
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"emu3-vllm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        # Ctrl-C in a terminal reaches the engine processes too; when they stop first, the engine call fails
        # before this process sees its KeyboardInterrupt. Every finished output is already on disk.
        if ctrl_c:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise


def _remember_ctrl_c() -> list:
    """A list that gets an entry when SIGINT arrives; SIGINT still raises KeyboardInterrupt as usual."""
    import signal

    seen: list = []

    def handler(signum, frame):
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, handler)
    return seen


def run() -> None:
    """The `emu3-vllm` command: `main`, then exit without the interpreter's teardown of vLLM, torch and
    transformers (several seconds of garbage collection on every run). Everything is written and closed by then:
    output files in `main`, the engine by its front end, and standard streams and logs here."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
