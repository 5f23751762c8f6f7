"""Images that stream as they are drawn: previews offline (`iter_images(previews=k)`) and through the server's
`stream`/`partial_images`, read with the real `openai` client, on the trained shapes checkpoint.

A preview is the rows drawn so far, VQ-decoded at the final size over a mid-grey fill; the finished image is the
one a request without previews makes, pixel for pixel.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from helpers.serving import SERVED_MODEL, start_server, wait_idle

pytestmark = pytest.mark.engine

SIDE = 64  # 8 token rows
SHAPES_MODEL = "shapes"
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
            "a orange triangle"]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _drawn_part_on_white(image, rows: int):
    """The preview's drawn rows on the world's white background: what the shapes classifier can read."""
    from PIL import Image

    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image.crop((0, 0, image.width, rows * 8)), (0, 0))
    return canvas


def _check_preview_against_final(preview_image, rows: int, final_image, caption: str) -> bool:
    """The preview's drawn rows are the final image's top rows (up to the decoder's smoothing at their lower
    edge), the rest is the grey fill; returns whether the classifier could read a colour from the drawn rows (and
    then it is the caption's)."""
    from emu3_vllm import shapes
    from emu3_vllm.offline.previews import FILL

    preview, final = _pixels(preview_image), _pixels(final_image)
    assert preview.shape == final.shape
    assert (preview[rows * 8:] == FILL).all()
    settled = (rows - 1) * 8  # the last drawn row still feels the missing rows below it through the decoder
    if settled:
        assert np.abs(preview[:settled] - final[:settled]).mean() < 16, rows
    drawn = _drawn_part_on_white(preview_image, rows)
    if rows * 2 < SIDE // 8 or shapes.non_white_mask(drawn).sum() < 30:
        return False
    colour, _ = shapes.classify(drawn)
    assert f"a {colour} " in caption, (caption, rows, colour)
    return True


# --------------------------------------------------------------------------------------------------------------
# Offline


def test_offline_previews_come_in_order_before_the_image_a_stream_without_them_makes(shapes_engine):
    from emu3_vllm.offline.previews import ImagePreview

    plain = dict(shapes_engine.iter_images(CAPTIONS[:3], height=SIDE, width=SIDE, seed=21))
    seen: dict[int, list] = {}
    for index, item in shapes_engine.iter_images(CAPTIONS[:3], height=SIDE, width=SIDE, seed=21, previews=2):
        seen.setdefault(index, []).append(item)
    assert sorted(seen) == [0, 1, 2]
    for index, items in seen.items():
        *previews, final = items
        assert [(type(p), p.preview_index, p.rows) for p in previews] == [(ImagePreview, 0, 3), (ImagePreview, 1, 6)]
        assert np.array_equal(_pixels(final.image), _pixels(plain[index].image)), index
        for preview in previews:
            _check_preview_against_final(preview.image, preview.rows, final.image, CAPTIONS[index])
    assert shapes_engine.llm.llm_engine.get_num_unfinished_requests() == 0


def test_offline_previews_are_checked_before_any_work(shapes_engine):
    for bad in (4, -1, True, "2", 1.5):
        with pytest.raises(ValueError, match="previews"):
            list(shapes_engine.iter_images(["a red circle"], height=SIDE, width=SIDE, previews=bad))
    with pytest.raises(ValueError, match="decode=True"):
        list(shapes_engine.iter_images(["a red circle"], height=SIDE, width=SIDE, previews=1, decode=False))


# --------------------------------------------------------------------------------------------------------------
# Through the server


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    from emu3_vllm import shapes_checkpoint

    flags = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "16"]
    with start_server([shapes_checkpoint(), "--served-model-name", SHAPES_MODEL, *flags],
                      tmp_path_factory.mktemp("shapes_server") / "server.log") as server:
        yield server


def test_a_streamed_request_sends_its_previews_then_the_image_a_plain_request_makes(shapes_server):
    client = shapes_server.client(timeout=300)
    stream = client.images.generate(model=SHAPES_MODEL, prompt="a blue square", size=f"{SIDE}x{SIDE}", n=2,
                                    stream=True, partial_images=3, extra_body={"seed": 40})
    events = list(stream)
    for event in events:
        print(event.type, event.model_extra, getattr(event, "partial_image_index", None), event.size,
              f"{len(event.b64_json)} base64 chars")
    by_image: dict[int, list] = {}
    for event in events:
        by_image.setdefault(event.model_extra["image_index"], []).append(event)
    assert sorted(by_image) == [0, 1]
    plain = client.images.generate(model=SHAPES_MODEL, prompt="a blue square", size=f"{SIDE}x{SIDE}", n=2,
                                   extra_body={"seed": 40})
    for index, image_events in by_image.items():
        *previews, completed = image_events
        assert completed.type == "image_generation.completed"
        assert {e.type for e in previews} == {"image_generation.partial_image"}
        # Every image's first preview; a later one only when the decoder keeps up (two images share it here).
        indices = [e.partial_image_index for e in previews]
        assert indices[0] == 0 and indices == sorted(set(indices)) and len(indices) <= 3, indices
        assert {(e.size, e.output_format, e.background, e.quality) for e in image_events} == {
            (f"{SIDE}x{SIDE}", "png", "opaque", "auto")}
        assert completed.model_extra["seed"] == 40 + index
        assert completed.b64_json == plain.data[index].b64_json  # the same PNG, byte for byte
        assert completed.usage.output_tokens == 8 * 9 + 3 and completed.usage.input_tokens > 0
        for preview in previews:
            assert _png(preview.b64_json).size == (SIDE, SIDE)
            rows = (2, 4, 6)[preview.partial_image_index]
            _check_preview_against_final(_png(preview.b64_json), rows, _png(completed.b64_json), "a blue square")

    # One image on an idle server: all three previews, in order, then the image.
    alone = list(client.images.generate(model=SHAPES_MODEL, prompt="a blue square", size=f"{SIDE}x{SIDE}",
                                        stream=True, partial_images=3, extra_body={"seed": 40}))
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in alone] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
        ("image_generation.partial_image", 2), ("image_generation.completed", None)]
    assert alone[-1].b64_json == plain.data[0].b64_json

    # partial_images 0 (or left out): the completed event alone.
    only = list(client.images.generate(model=SHAPES_MODEL, prompt="a red circle", size=f"{SIDE}x{SIDE}",
                                       stream=True, extra_body={"seed": 41}))
    assert [e.type for e in only] == ["image_generation.completed"]


def test_previews_show_the_top_of_the_final_shape(shapes_server):
    client = shapes_server.client(timeout=300)
    readable = 0
    for i, caption in enumerate(CAPTIONS):
        events = list(client.images.generate(model=SHAPES_MODEL, prompt=caption, size=f"{SIDE}x{SIDE}", stream=True,
                                             partial_images=3, extra_body={"seed": 60 + i}))
        final = _png(events[-1].b64_json)
        for event, rows in zip(events[:3], (2, 4, 6)):
            readable += _check_preview_against_final(_png(event.b64_json), rows, final, caption)
    print(f"{readable} of {2 * len(CAPTIONS)} previews with half the rows or more drawn show a readable colour")
    # Half the rows or more drawn: the classifier reads the caption's colour wherever the shape has begun (12 of 12
    # previews on these seeds; a shape that starts low has no ink in the drawn rows yet).
    assert readable >= 10, readable


def test_bad_streaming_values_are_400s_naming_the_field(shapes_server):
    import openai

    client = shapes_server.client(timeout=60, max_retries=0)
    for body, field in (({"partial_images": 4, "stream": True}, "partial_images"),
                        ({"partial_images": 2}, "partial_images"), ({"stream": "yes"}, "stream")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(model=SHAPES_MODEL, prompt="a red circle", extra_body=body)
        assert caught.value.body["param"] == field, caught.value.body


def test_a_client_that_leaves_mid_stream_leaves_nothing_running(emu3_server):
    import httpx

    wait_idle(emu3_server, 60)
    body = {"prompt": "a very large emu", "size": "240x240", "stream": True, "partial_images": 3, "seed": 3}
    seen = []
    # 240x240 on the random checkpoint: 930 tokens, tens of seconds; the first preview comes after 8 of 30 rows.
    with httpx.stream("POST", emu3_server.url + "/v1/images/generations", json=body, timeout=600) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                seen.append(line.removeprefix("event: "))
                break
    assert seen == ["image_generation.partial_image"]  # left after the first preview, mid-image
    print(f"nothing running or waiting {wait_idle(emu3_server, 10):.2f} s after the client left")
    reply = emu3_server.client(timeout=300).images.generate(model=SERVED_MODEL, prompt="an emu", size="16x16",
                                                             extra_body={"seed": 2})
    assert reply.data[0].b64_json
