"""`emu3-vllm serve`: a real server process on the tiny checkpoint, talked to with the real `openai` client.

Understanding on vLLM's own chat and completions routes equals `Emu3.understand`; `/v1/images/generations` equals
`Emu3.generate_images` pixel for pixel under 16 concurrent clients; bad input gets 400s naming the field; a client
that goes away leaves nothing running; lmms-eval's `openai` model evaluates through the server; and with two
data-parallel engines every pair stays on one engine.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers.engines import random_image
from helpers.outputs import image_pixels
from helpers.serving import SERVED_MODEL, SERVER_FLAGS, start_server, wait_idle

pytestmark = pytest.mark.engine

def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return image_pixels(base64.b64decode(b64))


# --------------------------------------------------------------------------------------------------------------
# Understanding


def test_chat_with_an_image_equals_understand(emu3_server, engine_factory):
    from emu3_vllm.offline.items import UnderstandingItem

    engine = engine_factory("a")
    image = random_image(48, 40, seed=3)
    client = emu3_server.client()
    offline = engine.understand([("What is this?", [image]), "Describe a cat."], max_new_tokens=8, use_tqdm=False)

    # The system text Emu3.understand puts first by default, sent as a system message.
    system = {"role": "system", "content": "You are a helpful assistant."}
    asks = [[{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": "What is this?"}],
            "Describe a cat."]
    for content, expected in zip(asks, offline):
        reply = client.chat.completions.create(model=SERVED_MODEL,
                                               messages=[system, {"role": "user", "content": content}],
                                               max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
        choice = reply.choices[0]
        assert list(choice.token_ids) == list(expected.token_ids)
        assert choice.message.content == str(expected)

    # /v1/completions takes the same prompt as text (BOS included).
    prompt = engine.build_understanding_prompt(UnderstandingItem("Describe a cat."))
    reply = client.completions.create(model=SERVED_MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert list(reply.choices[0].token_ids) == list(offline[1].token_ids)


def _odd_image_files() -> dict[str, tuple[str, bytes]]:
    """Files a viewer shows differently from a bare `convert("RGB")`: (media type, bytes) by name."""
    from PIL import Image

    def encoded(image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    photo = random_image(32, 48, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; a viewer rotates the picture upright
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:20, :, 3] = 200, 255  # the lower half is transparent: white to a viewer, black to convert()
    grey16 = (np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 34).astype(np.uint16)
    return {"EXIF-rotated JPEG": ("image/jpeg", encoded(photo, "JPEG", exif=exif)),
            "half-transparent RGBA PNG": ("image/png", encoded(Image.fromarray(rgba, "RGBA"), "PNG")),
            "16-bit grey PNG": ("image/png", encoded(Image.fromarray(grey16), "PNG"))}


def test_chat_reads_every_image_file_as_understand_does(emu3_server, engine_factory):
    """The same file gives the same answer offline and through the server: both read it with one loader."""
    engine = engine_factory("a")
    client = emu3_server.client()
    system = {"role": "system", "content": "You are a helpful assistant."}
    for name, (media_type, data) in _odd_image_files().items():
        (offline,) = engine.understand([("What is this?", [data])], max_new_tokens=8, use_tqdm=False)
        url = f"data:{media_type};base64," + base64.b64encode(data).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        messages = [system, {"role": "user", "content": content}]
        reply = client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=8, temperature=0,
                                               extra_body={"return_token_ids": True})
        assert offline.ok and list(reply.choices[0].token_ids) == list(offline.token_ids), name


# --------------------------------------------------------------------------------------------------------------
# Text to image


# (request fields, offline overrides, offline call settings); each request is one client.
IMAGE_REQUESTS = (
    [({"prompt": f"an emu on a hill, take {i}", "size": "32x32", "seed": 100 + 10 * i},
      {"height": 32, "width": 32}, {}) for i in range(12)]
    + [({"prompt": "two emus", "size": "24x40", "n": 2, "seed": 500, "guidance_scale": 2.0},
        {"height": 40, "width": 24, "cfg_scale": 2.0}, {}),
       ({"prompt": "a tall emu", "size": "16x32", "n": 3, "seed": 600, "negative_prompt": "blurry"},
        {"height": 32, "width": 16, "negative_prompt": "blurry"}, {}),
       ({"prompt": "a greedy emu", "size": "32x32", "seed": 7, "temperature": 0, "cfg_scale": 4.5},
        {"height": 32, "width": 32, "cfg_scale": 4.5}, {"temperature": 0.0}),
       ({"prompt": "a top-k emu", "size": "16x16", "seed": 8, "top_k": 16},
        {"height": 16, "width": 16}, {"top_k": 16})]
)


def test_images_equal_offline_generation_with_16_concurrent_clients(emu3_server, engine_factory):
    assert len(IMAGE_REQUESTS) == 16

    # Sixteen clients, made beforehand, send at one moment: on a busy machine, clients set up one after another
    # would arrive spread over more time than these small images take.
    clients = [emu3_server.client(timeout=600) for _ in IMAGE_REQUESTS]
    start = threading.Barrier(len(IMAGE_REQUESTS))

    def ask(client, request):
        fields, _, _ = request
        extra = {k: v for k, v in fields.items() if k not in ("prompt", "size", "n")}
        start.wait()
        return client.images.generate(
            model=SERVED_MODEL, prompt=fields["prompt"], size=fields["size"], n=fields.get("n", 1),
            response_format="b64_json", extra_body=extra)

    before = emu3_server.counters()
    with ThreadPoolExecutor(len(IMAGE_REQUESTS)) as pool:
        replies = list(pool.map(ask, clients, IMAGE_REQUESTS))
    after = emu3_server.counters()

    engine = engine_factory("a")
    compared = 0
    for (fields, overrides, settings), reply in zip(IMAGE_REQUESTS, replies):
        n = fields.get("n", 1)
        assert [item.seed for item in reply.data] == [fields["seed"] + i for i in range(n)]
        assert reply.size == fields["size"]
        prompts = [{"prompt": fields["prompt"], "seed": fields["seed"] + i, **overrides} for i in range(n)]
        for item, expected in zip(reply.data, engine.generate_images(prompts, use_tqdm=False, **settings)):
            assert expected.error is None, expected.error
            assert np.array_equal(pixels(item.b64_json), np.asarray(expected.image)), (fields, item.seed)
            compared += 1
    assert compared == 19
    # The 38 requests are more than the server's 16 sequences, so some waited their turn; and vLLM batched them:
    # without batching a step would generate 2 tokens (one pair), on average.
    per_step = (after["generated"] - before["generated"]) / (after["steps"] - before["steps"])
    print(f"{per_step:.1f} tokens generated per engine step")
    assert per_step > 2  # one pair alone makes 2 tokens a step; more means pairs shared steps


BAD_REQUESTS = [
    ({"size": "32x32"}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["an emu"]}, "prompt"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "32"}, "size"),
    ({"prompt": "x", "size": 32}, "size"),
    ({"prompt": "x", "size": "0x32"}, "size"),
    ({"prompt": "x", "size": "32x0"}, "size"),
    ({"prompt": "x", "size": "-32x32"}, "size"),
    ({"prompt": "x", "size": "400x400"}, "size"),  # beyond max_model_len 2048
    ({"prompt": "x", "size": "320x320", "negative_prompt": ""}, "size"),  # fits the context, not the KV cache
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": -1}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "guidance_scale": 0}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -2}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "NaN"}, "guidance_scale"),
    ({"prompt": "x", "cfg_scale": 0}, "cfg_scale"),
    ({"prompt": "x", "guidance_scale": 3, "cfg_scale": 4}, "cfg_scale"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "response_format": "webp"}, "response_format"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "top_k": 2.5}, "top_k"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),
    # Values that reached the engine and killed it, or blamed the wrong field, before the request model was typed.
    ({"prompt": "x", "top_k": 2**63}, "top_k"),
    ({"prompt": "x", "seed": 2**64 - 1}, "seed"),
    ({"prompt": "x", "seed": 2**64 + 5}, "seed"),
    ({"prompt": "x", "seed": 1e20}, "seed"),
    ({"prompt": "x", "seed": 2**63 - 1, "n": 2}, "seed"),
    ({"prompt": "x", "n": 1e300}, "n"),
    ({"prompt": "x", "negative_prompt": "n" * 200_000}, "negative_prompt"),
    ({"prompt": "x", "negative_prompt": "n" * 3000}, "negative_prompt"),  # fits the setting, not max_model_len
    ({"prompt": "p" * 3000}, "prompt"),
    ({"prompt": "x", "size": "8x8"}, "size"),
    ({"prompt": "x", "size": "4x4"}, "size"),
    ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": "x", "partial_images": 2}, "partial_images"),
    ({"prompt": "x", "partial_images": 1}, "partial_images"),
    ({"prompt": "x", "model": 5}, "model"),
]


def test_bad_requests_get_400_naming_the_field_and_the_server_stays_healthy(emu3_server):
    url = emu3_server.url + "/v1/images/generations"
    with httpx.Client(timeout=60) as http:
        for body, field in BAD_REQUESTS:
            reply = http.post(url, json={"model": SERVED_MODEL, **body})
            assert reply.status_code == 400, (body, reply.text)
            error = reply.json()["error"]
            assert error["param"] == field and error["code"] == 400 and error["message"], (body, error)
            # One line, about the field as the user wrote it, and short whatever the value's size.
            assert error["message"].startswith(field) and len(error["message"]) < 300, error["message"]
        raw = {b'{"prompt": "an emu", "size": ': None, b'{"prompt": "x", "guidance_scale": NaN}': "guidance_scale",
               b"[1, 2]": None, b'"an emu"': None, b"\xff\xfe{": None,
               b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}": "seed"}  # past Python's 4300-digit int()
        for content, field in raw.items():
            reply = http.post(url, content=content, headers={"content-type": "application/json"})
            assert reply.status_code == 400, (content[:60], reply.text)
            error = reply.json()["error"]
            assert error["param"] == field and error["code"] == 400 and len(error["message"]) < 300, error
        reply = http.post(url, json={"prompt": "x", "model": "another-model"})
        assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
        assert http.get(emu3_server.url + "/health").status_code == 200
    # The engine survived all of it: a normal image still comes back; with no size, the checkpoint's own area
    # (64x64 for the tiny checkpoint, which this server holds).
    good = emu3_server.client(timeout=300).images.generate(model=SERVED_MODEL, prompt="an emu", size="16x16",
                                                            extra_body={"seed": 1})
    assert good.data[0].b64_json and pixels(good.data[0].b64_json).shape == (16, 16, 3)
    auto = emu3_server.client(timeout=300).images.generate(model=SERVED_MODEL, prompt="an emu", extra_body={"seed": 1})
    assert auto.size == "64x64" and pixels(auto.data[0].b64_json).shape == (64, 64, 3)


def test_chat_media_a_server_cannot_load_is_a_400_and_keeps_the_connection(emu3_server):
    import http.client

    import openai

    client = emu3_server.client(timeout=60)
    for url in ("file:///etc/hostname", "http://127.0.0.1:9/x.png"):  # no --allowed-local-media-path; refused
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=SERVED_MODEL, max_tokens=4,
                                           messages=[{"role": "user", "content": content}])
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == "image_url", error
        assert "cannot load the image_url" in error["message"], error

    # vLLM answered these with a 500 and then closed the connection; now the client keeps its connection.
    body = json.dumps({"model": SERVED_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}, {"type": "text", "text": "Hi"}]}]})
    connection = http.client.HTTPConnection("127.0.0.1", emu3_server.port, timeout=60)
    try:
        for attempt in range(2):
            connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            if attempt == 0:
                socket = connection.sock
            reply = connection.getresponse()
            assert reply.status == 400 and json.loads(reply.read())["error"]["code"] == 400
            assert connection.sock is socket  # the same connection answered both
        # A body FastAPI cannot parse gets OpenAI's error shape too, not FastAPI's {"detail": ...}.
        connection.request("POST", "/v1/chat/completions", b"\xff", {"content-type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 400 and json.loads(reply.read())["error"]["code"] == 400
    finally:
        connection.close()
    assert httpx.get(emu3_server.url + "/health").status_code == 200
    reply = client.chat.completions.create(model=SERVED_MODEL, max_tokens=2,
                                           messages=[{"role": "user", "content": "Describe a cat."}])
    assert reply.choices[0].message.content is not None


def test_a_client_that_goes_away_mid_image_leaves_nothing_running(emu3_server):
    import asyncio

    import openai

    wait_idle(emu3_server, 60)

    async def leave_mid_image() -> dict:
        client = openai.AsyncOpenAI(base_url=emu3_server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=600)
        # 240x240: 930 image tokens, tens of seconds of decoding, so the client leaves mid-image however slowly
        # this process gets to watch.
        before = await asyncio.to_thread(emu3_server.counters)
        request = asyncio.ensure_future(client.images.generate(model=SERVED_MODEL, prompt="a very large emu",
                                                               size="240x240", extra_body={"seed": 3}))
        try:
            # Leave only once the pair is decoding, however slowly a busy machine gets it there.
            for _ in range(1200):
                gauges = await asyncio.to_thread(emu3_server.gauges)
                generated = (await asyncio.to_thread(emu3_server.counters))["generated"] - before["generated"]
                if gauges["running"] >= 2 or generated >= 2:
                    return {**gauges, "tokens_generated": generated}
                assert not request.done(), "the image finished before the client could leave"
                await asyncio.sleep(0.05)
            raise AssertionError(f"the image never started: {gauges}")
        finally:
            request.cancel()  # closes the connection mid-image, as a client that gives up does
            await asyncio.gather(request, return_exceptions=True)
            await client.close()

    print(f"in the engine when the client left: {asyncio.run(leave_mid_image())}")
    print(f"nothing running or waiting {wait_idle(emu3_server, 10):.2f} s after the client left")
    # Both halves went: a stranded half would hold the pair scheduler, and the next image would never start.
    reply = emu3_server.client(timeout=300).images.generate(model=SERVED_MODEL, prompt="an emu", size="16x16",
                                                             extra_body={"seed": 2})
    assert reply.data[0].b64_json


# --------------------------------------------------------------------------------------------------------------
# lmms-eval's own OpenAI model, pointed at the server


def test_lmms_eval_openai_model_through_the_server(emu3_server, engine_factory, tmp_path):
    from test_lmms_eval import TASK, UTILS, _response, run_lmms_eval

    root = tmp_path / "tasks"
    root.mkdir()
    images = []
    for i, (h, w) in enumerate([(48, 48), (40, 72)]):
        images.append(str(root / f"img{i}.png"))
        random_image(h, w, seed=40 + i).save(images[-1])
    docs = [{"question": "What is in the picture?", "images": [images[0]], "answer": "a cat"},
            {"question": "Compare the two pictures.", "images": images, "answer": "same"},
            {"question": "Say hello.", "images": [], "answer": "hello"}]
    (root / "utils.py").write_text(UTILS)
    (root / "emu3_api_und.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "emu3_api_und.yaml").write_text(TASK.format(
        name="emu3_api_und", data=root / "emu3_api_und.jsonl", output_type="generate_until", visual="doc_to_visual",
        text="doc_to_text", metric="exact_match",
        gen_kwargs="  max_new_tokens: 8\n  do_sample: false\n  temperature: 0"))

    args = f"model={SERVED_MODEL},base_url={emu3_server.url}/v1,num_concurrent=2,max_retries=1"
    proc, results, samples = run_lmms_eval("openai", args, "emu3_api_und", {"root": root}, tmp_path,
                                           env={"OPENAI_API_KEY": "EMPTY"})
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exact_match,none" in results["results"]["emu3_api_und"]
    answers = {s["doc_id"]: _response(s) for s in samples}
    assert sorted(answers) == [0, 1, 2]
    assert not any("LMMS_EVAL_REQUEST_FAILED" in a for a in answers.values()), answers

    from PIL import Image

    # lmms-eval sends one user turn, images first, and no system message.
    offline = engine_factory("a").understand(
        [(d["question"], [Image.open(p).convert("RGB") for p in d["images"]]) for d in docs],
        max_new_tokens=8, system_prompt="", use_tqdm=False)
    assert [answers[i].strip() for i in range(3)] == [str(a).strip() for a in offline]


# --------------------------------------------------------------------------------------------------------------
# Two data-parallel engines behind one API server


def _finished_requests_per_engine(server) -> dict[str, float]:
    """vLLM's finished-request counters from /metrics, summed over finish reasons, by data-parallel engine."""
    totals: dict[str, float] = {}
    for line in httpx.get(server.url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            totals[engine] = totals.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_pairs_stay_whole_across_two_data_parallel_engines(checkpoints, engine_factory, tmp_path):
    # One API server (vLLM would start one per engine, and each would count only what it sent).
    server = start_server([checkpoints["a"], "--served-model-name", SERVED_MODEL, *SERVER_FLAGS,
                           "--data-parallel-size", "2", "--api-server-count", "1"], tmp_path / "server_dp2.log")
    try:
        def ask(i):
            return server.client(timeout=600).images.generate(
                model=SERVED_MODEL, prompt=f"an emu on engine {i % 2}, take {i}", size="48x48", n=2,
                extra_body={"seed": 1000 + 10 * i})

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(8)))
        deadline = time.monotonic() + 30  # the counters are updated as the engines' stats arrive
        while sum((finished := _finished_requests_per_engine(server)).values()) < 32 and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"DP=2 server up in {server.start_seconds:.0f} s; requests finished per engine: {finished}")
        # All 16 images came back, so no pair was split (a half would wait forever for its twin on the other
        # engine); both engines drew some, and each finished whole pairs.
        assert set(finished) == {"0", "1"} and sum(finished.values()) >= 32, finished
        assert all(count >= 2 and count % 2 == 0 for count in finished.values()), finished
        engine = engine_factory("a")
        for i, reply in enumerate(replies):
            expected = engine.generate_images([f"an emu on engine {i % 2}, take {i}"] * 2, height=48, width=48,
                                              seed=1000 + 10 * i, use_tqdm=False)
            for item, image in zip(reply.data, expected):
                assert np.array_equal(pixels(item.b64_json), np.asarray(image.image))
        wait_idle(server, 10)
    finally:
        server.stop()
