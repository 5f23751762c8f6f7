"""What `emu3-vllm serve` and the images route decide without a running engine: the server's flags and chat
template, the request checks, the data-parallel rank choice and the decode batching."""

from __future__ import annotations

import asyncio
import math

import pytest

from emu3_vllm.images_api import ImagesRequest, RankChooser, choose_rank, parse_images_request, parse_size
from emu3_vllm.inputs import ItemError


# --------------------------------------------------------------------------------------------------------------
# The launcher


def test_plugin_allowlist_adds_both_plugins_to_the_users():
    from emu3_vllm.serve import plugin_allowlist

    assert plugin_allowlist(None) == "emu3_vllm,emu3_vllm_images"
    assert plugin_allowlist("lora_filesystem_resolver, emu3_vllm") == \
        "lora_filesystem_resolver,emu3_vllm,emu3_vllm_images"


def test_serve_args_come_from_the_shared_engine_setup_and_keep_the_users(checkpoints):
    import os

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from emu3_vllm.engine import emu3_engine_kwargs
    from emu3_vllm.prompts import EMU3_CHAT_TEMPLATE
    from emu3_vllm.serve import emu3_serve_args

    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        pytest.skip("a CPU binding is set for this session")
    parser = make_arg_parser(FlexibleArgumentParser())
    expected, _ = emu3_engine_kwargs({})

    args = emu3_serve_args(parser.parse_args([checkpoints["a"]]))
    assert args.scheduler_cls == expected["scheduler_cls"] and args.logits_processors == expected["logits_processors"]
    # The checkpoint carries Emu3-Chat-hf's template, which has no BOS: the server's renders BOS first.
    assert args.chat_template == "{{ bos_token }}" + EMU3_CHAT_TEMPLATE

    mine = "my_pkg.processors:Mine"
    args = emu3_serve_args(parser.parse_args([checkpoints["a"], "--logits-processors", mine, "--scheduler-cls",
                                              "my_pkg.Sched", "--chat-template", "{{ messages }}"]))
    assert args.logits_processors == [mine, *expected["logits_processors"]]
    assert args.scheduler_cls == "my_pkg.Sched" and args.chat_template == "{{ messages }}"

    # Two data-parallel engines on a CPU get a core each (the binding this session's engines do without).
    try:
        emu3_serve_args(parser.parse_args([checkpoints["a"], "--data-parallel-size", "2"]))
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def test_a_checkpoint_without_a_chat_template_is_served_with_emu3_chat_hfs(tmp_path):
    from emu3_vllm import make_random_checkpoint
    from emu3_vllm.prompts import EMU3_CHAT_TEMPLATE
    from emu3_vllm.serve import server_chat_template, with_bos

    path = make_random_checkpoint(tmp_path / "plain", size="tiny", write_weights=False)
    (path / "chat_template.jinja").unlink()
    assert server_chat_template(str(path)) == "{{ bos_token }}" + EMU3_CHAT_TEMPLATE
    placed = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert with_bos(placed) == placed


def test_serve_refuses_a_missing_model_before_starting_anything(tmp_path):
    from cli_helpers import cli

    done = cli("serve", tmp_path / "nowhere", "--port", "1", timeout=300)
    assert done.returncode == 2 and "no such checkpoint folder" in done.stderr, done.stderr[-2000:]
    done = cli("serve", timeout=300)
    assert done.returncode == 2 and "give the Emu3 checkpoint" in done.stderr, done.stderr[-2000:]
    # Both are refused before vLLM loads: a typo costs no half-minute of imports.
    assert "vllm" not in done.stderr.lower().replace("emu3-vllm", ""), done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------------
# The request


def parse(**fields):
    return parse_images_request(ImagesRequest(**fields), draw_seed=lambda: 41)


def field_of(**fields) -> str:
    with pytest.raises(ItemError) as caught:
        parse(**fields)
    return caught.value.field


def test_a_request_becomes_one_spec_per_image_seeded_seed_plus_i():
    from emu3_vllm.inputs import GenerationDefaults, image_spec

    call = parse(prompt="an emu", n=3, size="40x24", seed=9, guidance_scale=2.5, negative_prompt="", top_k=5,
                 temperature=0)
    assert call.size == "40x24" and [s.seed for s in call.specs] == [9, 10, 11]
    settings = GenerationDefaults(height=24, width=40, cfg_scale=2.5, negative_prompt="", top_k=5, temperature=0.0)
    assert call.specs[1] == image_spec("an emu", where="image 1", defaults=settings, seed=10)
    # Defaults: one image, Emu3's 720x720, the offline API's scale/negative prompt/top-k/temperature, a drawn seed.
    default = parse(prompt="an emu").specs
    assert len(default) == 1 and default[0] == image_spec("an emu", where="", defaults=GenerationDefaults(), seed=41)
    assert parse(prompt="x", cfg_scale=4.0).specs[0].cfg_scale == 4.0
    assert parse(prompt="x", guidance_scale=4.0, cfg_scale=4.0).specs[0].cfg_scale == 4.0
    assert parse(prompt="x", size="auto").size == "720x720"
    assert parse(prompt="x", size="20x30").size == "24x32"  # each side rounded to a multiple of 8


@pytest.mark.parametrize("fields, field", [
    ({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": 1}, "prompt"), ({"prompt": None}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": 11}, "n"), ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "size": "1024"}, "size"), ({"prompt": "x", "size": "0x8"}, "size"),
    ({"prompt": "x", "size": "-8x8"}, "size"), ({"prompt": "x", "size": "3x3"}, "size"),
    ({"prompt": "x", "size": [8, 8]}, "size"),
    ({"prompt": "x", "guidance_scale": math.nan}, "guidance_scale"), ({"prompt": "x", "guidance_scale": 0}, "guidance_scale"),
    ({"prompt": "x", "cfg_scale": math.inf}, "cfg_scale"), ({"prompt": "x", "guidance_scale": 2, "cfg_scale": 3}, "cfg_scale"),
    ({"prompt": "x", "response_format": "url"}, "response_format"), ({"prompt": "x", "response_format": 1}, "response_format"),
    ({"prompt": "x", "seed": 1.5}, "seed"), ({"prompt": "x", "seed": True}, "seed"),
    ({"prompt": "x", "top_k": "all"}, "top_k"), ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
])
def test_each_bad_field_is_named(fields, field):
    assert field_of(**fields) == field


def test_size_is_width_by_height():
    assert parse_size("64x32") == (32, 64) and parse_size(" 16 X 8 ") == (8, 16)


# --------------------------------------------------------------------------------------------------------------
# Data-parallel rank choice


def test_choose_rank_takes_the_least_loaded_engine_and_rotates_ties():
    assert choose_rank([0, 0], None, 0) == 0 and choose_rank([0, 0], None, 1) == 1
    assert choose_rank([2, 1, 3], None, 0) == 1
    # The coordinator's counts (waiting, running) weigh in when they show more than this server's pairs.
    assert choose_rank([0, 1], [(5, 4), (1, 1)], 0) == 1
    assert choose_rank([1, 0], [(0, 2), (0, 0)], 0) == 1


def test_rank_chooser_gives_each_pair_one_rank_and_balances():
    single = RankChooser(1)
    assert single.acquire() is None  # one engine: vLLM needs no rank
    chooser = RankChooser(2)
    ranks = [chooser.acquire() for _ in range(6)]
    assert sorted(ranks) == [0, 0, 0, 1, 1, 1] and chooser.pairs_in_flight == [3, 3]
    for rank in (0, 0, 0):
        chooser.release(rank)
    assert [chooser.acquire() for _ in range(3)] == [0, 0, 0]
    stale = RankChooser(2, lambda: [(0, 0)])  # a snapshot of the wrong shape is ignored
    assert {stale.acquire(), stale.acquire()} == {0, 1}


# --------------------------------------------------------------------------------------------------------------
# Decode batching


def test_decoding_batches_what_waits_and_a_failed_batch_fails_only_its_images():
    import threading

    from PIL import Image

    from emu3_vllm.async_decode import AsyncDecoder, DecodeError

    gate = threading.Event()
    calls = []

    def decode(grids):
        calls.append(len(grids))
        gate.wait(5)
        if any(g[0][0] < 0 for g in grids):
            raise RuntimeError("bad codes")
        return [Image.new("RGB", (len(g[0]) * 8, len(g) * 8), (g[0][0], 0, 0)) for g in grids]

    async def run():
        decoder = AsyncDecoder(decode, max_batch=4)
        first = asyncio.ensure_future(decoder.encode([[1]]))
        await asyncio.sleep(0.05)  # the first grid is decoding on the worker thread
        rest = [asyncio.ensure_future(decoder.encode([[i, i]])) for i in range(2, 8)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *rest)
        gate.clear()
        bad = asyncio.ensure_future(decoder.encode([[-1]]))
        await asyncio.sleep(0.05)
        good = asyncio.ensure_future(decoder.encode([[9]]))
        gate.set()
        outcome = await asyncio.gather(bad, good, return_exceptions=True)
        decoder.close()
        return results, outcome, decoder.batches

    results, (bad, good), batches = asyncio.run(run())
    assert calls[:3] == [1, 4, 2] and batches == [1, 4, 2, 1]  # the six that waited went as 4 + 2
    assert all(isinstance(r, str) and r for r in results + [good])
    assert isinstance(bad, DecodeError) and "bad codes" in str(bad)
