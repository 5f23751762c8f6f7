"""What `emu3-vllm serve` and the images route decide without a running engine: the server's flags and chat
template, the request checks, the data-parallel rank choice and the decode batching."""

from __future__ import annotations

import asyncio
import json

import pytest

from emu3_vllm.offline.items import ItemError
from emu3_vllm.serving.images_protocol import (
    ImagesCall,
    ImagesRequest,
    ImagesResponse,
    parse_images_request,
    parse_size,
    read_images_request,
)
from emu3_vllm.serving.images_route import ImagesPlugin, RankChooser, auto_side, checkpoint_image_area, choose_rank

# --------------------------------------------------------------------------------------------------------------
# The launcher


def test_plugin_allowlist_adds_both_plugins_to_the_users():
    from emu3_vllm.serving.launcher import plugin_allowlist

    assert plugin_allowlist(None) == "emu3_vllm,emu3_vllm_images"
    assert plugin_allowlist("lora_filesystem_resolver, emu3_vllm") == \
        "lora_filesystem_resolver,emu3_vllm,emu3_vllm_images"


def test_serve_args_come_from_the_shared_engine_setup_and_keep_the_users(checkpoints):
    import os

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from emu3_vllm.engine import emu3_engine_kwargs
    from emu3_vllm.prompts import EMU3_CHAT_TEMPLATE
    from emu3_vllm.serving.launcher import emu3_serve_args

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
    from emu3_vllm.serving.launcher import server_chat_template, with_bos

    path = make_random_checkpoint(tmp_path / "plain", size="tiny", write_weights=False)
    (path / "chat_template.jinja").unlink()
    assert server_chat_template(str(path)) == "{{ bos_token }}" + EMU3_CHAT_TEMPLATE
    placed = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert with_bos(placed) == placed


@pytest.mark.engine  # runs the CLI
def test_serve_refuses_a_missing_model_before_starting_anything(tmp_path):
    from helpers.cli import cli

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


def read(body) -> ImagesCall:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_images_request(read_images_request(raw), auto_size=(64, 64), draw_seed=lambda: 41)


def error_of(body) -> ItemError:
    with pytest.raises(ItemError) as caught:
        read(body)
    return caught.value


def test_a_request_becomes_one_spec_per_image_seeded_seed_plus_i():
    from emu3_vllm.offline.items import GenerationDefaults, image_spec

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
    # "auto" or no size is the server's square; JSON's 64.0 is an integer; OpenAI's newer fields are ignored.
    assert read({"prompt": "x"}).size == read({"prompt": "x", "size": " auto "}).size == "64x64"
    assert [s.seed for s in read({"prompt": "x", "n": 2.0, "seed": -5}).specs] == [-5, -4]
    assert read({"prompt": "x", "quality": "hd", "style": 3, "output_format": "webp", "background": None,
                 "output_compression": [1], "moderation": "low", "user": "u", "stream": False,
                 "unknown": {"a": 1}}).size == "64x64"


@pytest.mark.parametrize("body, field", [
    ({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "  "}, "prompt"), ({"prompt": 1}, "prompt"),
    ({"prompt": None}, "prompt"), ({"prompt": ["x"]}, "prompt"), ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": "x" * 100_001}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": 11}, "n"), ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"), ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "size": "1024"}, "size"), ({"prompt": "x", "size": "0x8"}, "size"),
    ({"prompt": "x", "size": "-8x8"}, "size"), ({"prompt": "x", "size": "3x3"}, "size"),
    ({"prompt": "x", "size": "8x8"}, "size"), ({"prompt": "x", "size": "4x4"}, "size"),
    ({"prompt": "x", "size": "8200x16"}, "size"), ({"prompt": "x", "size": "9" * 5000 + "x8"}, "size"),
    ({"prompt": "x", "size": [8, 8]}, "size"), ({"prompt": "x", "size": 32}, "size"),
    ({"prompt": "x", "guidance_scale": 0}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 1001}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "3"}, "guidance_scale"), ({"prompt": "x", "cfg_scale": 0}, "cfg_scale"),
    ({"prompt": "x", "guidance_scale": 2, "cfg_scale": 3}, "cfg_scale"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "response_format": "webp"}, "response_format"),
    ({"prompt": "x", "response_format": 1}, "response_format"),
    ({"prompt": "x", "seed": 1.5}, "seed"), ({"prompt": "x", "seed": True}, "seed"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "seed": 2**64 - 1}, "seed"), ({"prompt": "x", "seed": 2**64 + 5}, "seed"),
    ({"prompt": "x", "seed": 1e20}, "seed"), ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
    ({"prompt": "x", "seed": 2**63 - 1, "n": 2}, "seed"),  # image 1 would get seed 2**63
    ({"prompt": "x", "top_k": 2**63}, "top_k"), ({"prompt": "x", "top_k": 2**31}, "top_k"),
    ({"prompt": "x", "top_k": "all"}, "top_k"), ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"), ({"prompt": "x", "temperature": 1e9}, "temperature"),
    ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
    ({"prompt": "x", "negative_prompt": "n" * 200_000}, "negative_prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": "x", "partial_images": 2}, "partial_images"), ({"prompt": "x", "stream": False, "partial_images": 1},
                                                               "partial_images"),
    ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
    ({"prompt": "x", "stream": True, "partial_images": -1}, "partial_images"),
    ({"prompt": "x", "stream": True, "partial_images": "2"}, "partial_images"),
    ({"prompt": "x", "model": 3}, "model"), ({"prompt": "x", "user": {}}, "user"),
])
def test_each_bad_field_is_named_in_one_short_line(body, field):
    error = error_of(body)
    assert error.field == field, (body, str(error))
    message = str(error)
    assert message.startswith(field) and "\n" not in message and len(message) < 200, message


def test_values_past_what_python_parses_are_named_and_quoted_briefly():
    # 5000 digits: Python's int() refuses past 4300, and 10**400 has no float.
    error = error_of(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}")
    assert error.field == "seed" and str(error) == "seed must be <= 9223372036854775807, got an integer of 5000 digits"
    error = error_of(b'{"prompt": "x", "guidance_scale": -' + b"1" * 400 + b"}")
    assert error.field == "guidance_scale" and "an integer of 400 digits" in str(error)
    error = error_of({"prompt": "x", "n": 1e300})
    assert error.field == "n" and str(error) == "n must be <= 10, got 1e+300"
    error = error_of({"prompt": "x", "seed": 2**64 + 5})
    assert str(error) == "seed must be <= 9223372036854775807, got 18446744073709551621"
    # NaN is not JSON, yet Python's (and many clients') JSON has it: it reaches the field that refuses it.
    error = error_of(b'{"prompt": "x", "guidance_scale": NaN}')
    assert error.field == "guidance_scale" and "finite" in str(error)
    assert "url" in str(error_of({"prompt": "x", "response_format": "url"})) and "b64_json" in str(
        error_of({"prompt": "x", "response_format": "url"}))


@pytest.mark.parametrize("body", [b'{"prompt": "an emu", "size": ', b"[1, 2]", b'"an emu"', b"", b"\xff\xfe\x00",
                                  b"[" * 100_000, b"null"])
def test_a_body_that_is_no_json_object_is_refused_without_a_field(body):
    error = error_of(body)
    assert error.field is None and "request body" in str(error) and len(str(error)) < 200, str(error)


def test_size_is_width_by_height():
    assert parse_size("64x32") == (32, 64) and parse_size(" 16 X 8 ") == (8, 16)
    assert parse_size(None, (48, 48)) == parse_size("auto", (48, 48)) == (48, 48)


def test_auto_size_is_the_largest_square_of_the_area_that_fits(tmp_path):
    from emu3_vllm import make_random_checkpoint

    assert auto_side(518_400, lambda side: True) == 720
    assert auto_side(4096, lambda side: True) == 64
    assert auto_side(518_400, lambda side: side <= 300) == 296  # a multiple of 8
    assert auto_side(518_400, lambda side: False) == 16  # the smallest square image: 2x2 tokens
    assert auto_side(1, lambda side: True) == 16
    # The checkpoint's own area (make_random_checkpoint records it), else transformers' Emu3Processor default.
    path = make_random_checkpoint(tmp_path / "c", size="tiny", write_weights=False)
    assert checkpoint_image_area(path) == 4096
    (path / "emu3_vllm.json").unlink()
    assert checkpoint_image_area(path) == 518_400


def test_the_schema_states_the_types_and_bounds_and_only_the_errors_that_happen():
    from fastapi import FastAPI

    app = FastAPI()
    ImagesPlugin().attach_router(app)
    document = app.openapi()
    operation = document["paths"]["/v1/images/generations"]["post"]
    body = operation["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt"]
    props = schema["properties"]
    assert props["prompt"]["type"] == "string" and props["prompt"]["maxLength"] == 100_000

    def typed(name):
        return next(option for option in props[name]["anyOf"] if option["type"] != "null")

    assert typed("n")["type"] == "integer" and (typed("n")["minimum"], typed("n")["maximum"]) == (1, 10)
    assert typed("top_k")["maximum"] == 2**31 - 1 and typed("seed")["type"] == "integer"
    assert typed("guidance_scale")["exclusiveMinimum"] == 0 and typed("temperature")["minimum"] == 0
    assert typed("negative_prompt")["maxLength"] == 100_000 and typed("stream")["type"] == "boolean"
    assert typed("response_format")["const"] == "b64_json" and typed("size")["pattern"]
    assert set(operation["responses"]) == {"200", "400", "404"}  # no 422: the route validates its body itself

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(document))
    assert "#/components/schemas/ImagesResponse" in found
    for ref in found:  # every reference resolves within the document
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in document["components"]["schemas"]
    # The response model holds what the route answers.
    ImagesResponse.model_validate({"created": 1, "size": "16x16", "output_format": "png",
                                   "data": [{"b64_json": "AA==", "seed": 3}, {"b64_json": None, "seed": 4,
                                                                              "error": "image 1: failed"}]})


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

    from emu3_vllm.offline.vq_decode import DecodeBatcher, DecodeError
    from emu3_vllm.serving.images_route import png_b64

    gate = threading.Event()
    calls = []

    def decode(grids):
        calls.append(len(grids))
        gate.wait(5)
        if any(g[0][0] < 0 for g in grids):
            raise RuntimeError("bad codes")
        return [Image.new("RGB", (len(g[0]) * 8, len(g) * 8), (g[0][0], 0, 0)) for g in grids]

    async def run():
        decoder = DecodeBatcher(decode, max_batch=4, postprocess=png_b64)

        def encode(grid):
            return asyncio.wrap_future(decoder.submit(grid))

        first = encode([[1]])
        await asyncio.sleep(0.05)  # the first grid is decoding on the worker thread
        rest = [encode([[i, i]]) for i in range(2, 8)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *rest)
        gate.clear()
        bad = encode([[-1]])
        await asyncio.sleep(0.05)
        good = encode([[9]])
        gate.set()
        outcome = await asyncio.gather(bad, good, return_exceptions=True)
        decoder.close()
        return results, outcome, decoder.batches

    results, (bad, good), batches = asyncio.run(run())
    assert calls[:3] == [1, 4, 2] and batches == [1, 4, 2, 1]  # the six that waited went as 4 + 2
    assert all(isinstance(r, str) and r for r in results + [good])
    assert isinstance(bad, DecodeError) and "bad codes" in str(bad)


def test_decoding_skips_cancelled_grids_and_close_cancels_what_waits():
    import threading
    import time

    from emu3_vllm.offline.vq_decode import DecodeBatcher

    gate = threading.Event()
    calls = []

    def decode(grids):
        calls.append([g[0][0] for g in grids])
        gate.wait(5)
        return [g[0][0] for g in grids]

    decoder = DecodeBatcher(decode, max_batch=8)
    first = decoder.submit([[1]])
    while not calls:  # the first grid is decoding
        time.sleep(0.01)
    cancelled, kept = decoder.submit([[2]]), decoder.submit([[3]])
    assert cancelled.cancel()
    gate.set()
    assert first.result(5) == 1 and kept.result(5) == 3 and calls == [[1], [3]]
    gate.clear()
    busy = decoder.submit([[4]])
    while len(calls) < 3:
        time.sleep(0.01)
    waiting = decoder.submit([[5]])
    threading.Timer(0.1, gate.set).start()
    assert decoder.close() > 0  # the batch in hand finishes; the one waiting is never decoded
    assert busy.result() == 4 and waiting.cancelled() and calls == [[1], [3], [4]]
    assert decoder.batches == [1, 1, 1]
