"""Bad items get a clear error naming them; the other items of the same call are still answered."""

from __future__ import annotations

import pytest
from helpers.engines import random_image
from PIL import Image

pytestmark = pytest.mark.engine


def test_bad_items_do_not_sink_the_batch(engine_factory, tmp_path):
    engine = engine_factory("a")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    good_image = random_image(48, 48, seed=7)
    items = [
        "Describe a cat.",                                              # 0 good
        ("What is this?", [str(corrupt)]),                              # 1 corrupt file
        ("What is this?", [Image.new("RGB", (0, 0))]),                  # 2 zero-size image
        "word " * 2000,                                                 # 3 longer than max_model_len (1024)
        ("Compare <image> and <image> and <image>", [good_image]),      # 4 more placeholders than images
        ("What is this?", [good_image]),                                # 5 good
        ("What is this?", [b"\x00\x01garbage"]),                        # 6 undecodable bytes
        42,                                                             # 7 not a text
    ]
    answers = engine.understand(items, max_new_tokens=8, use_tqdm=False)
    assert len(answers) == len(items)

    expected_errors = {1: "cannot decode image", 2: "zero size", 3: "maximum context length", 4: "placeholder",
                       6: "cannot decode image", 7: "text"}
    for i, fragment in expected_errors.items():
        assert answers[i].error is not None, i
        assert f"item {i}" in answers[i].error, answers[i].error
        assert fragment in answers[i].error, answers[i].error
        assert answers[i] == ""

    alone = engine.understand([items[0], items[5]], max_new_tokens=8, use_tqdm=False)
    for i, ref in zip([0, 5], alone):
        assert answers[i].error is None
        assert answers[i].token_ids == ref.token_ids and len(ref.token_ids) > 0
