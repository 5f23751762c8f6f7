"""`emu3-vllm demo`: the trained shapes checkpoint answering questions about pictures and drawing pictures.

Everything runs on the checkpoint that ships with the package, so the first command a user runs shows Emu3's two
jobs working: JSON lines of answers (with the expected answer beside each), PNGs of drawn captions (with what the
world's pixel classifier reads back from each), and a contact sheet of the same captions at CFG scales 1, 3 and 5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from emu3_vllm.shapes.world import (
    COLOUR_QUESTION,
    DESCRIBE_QUESTION,
    SHAPE_QUESTION,
    SHAPES,
    caption,
    classify,
    samples,
)

# The world's own caption form, "a {colour} {shape}", which is what the checkpoint learned to draw.
DEMO_CAPTIONS = tuple(caption(c, s) for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                                   ("yellow", "circle"), ("purple", "square"), ("orange", "triangle")))
CONTACT_SHEET_SCALES = (1.0, 3.0, 5.0)
PREVIEW_CAPTION = DEMO_CAPTIONS[1]
SIZE = 64


def contact_sheet(rows: list[list[Any]], row_labels: list[str], column_labels: list[str], path: Path,
                  title: str = "emu3_vllm shapes checkpoint: the same captions and seeds at three CFG scales") -> Path:
    """A labelled grid of PIL images (e.g. one row per CFG scale, one column per caption), written with
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(column_labels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 0.8, 1.7 * n_rows + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r][c]
            if image is not None:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str | Path = "out", *, engine=None, stdout: TextIO | None = None, seed: int = 0,
             max_new_tokens: int = 32, **engine_kwargs: Any) -> int:
    """Answer questions about a few shape images and draw a few captions with the shapes checkpoint.

    `engine`: an `Emu3` on the shapes checkpoint, left open for the caller; without one, the demo starts one with
    `engine_kwargs` (any `vllm.LLM` arguments) and closes it. Prints one JSON line per answer and per drawn image to
    `stdout` (default: sys.stdout), and where the images and the contact sheet went. Returns 0 when every question was
    answered and every image drawn, 1 otherwise.
    """
    from emu3_vllm.shapes.trained import shapes_checkpoint

    if stdout is None:
        stdout = sys.stdout

    def emit(record: dict) -> None:
        stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        stdout.flush()

    out = Path(out_dir)
    images_dir, drawn_dir = out / "images", out / "generated"
    images_dir.mkdir(parents=True, exist_ok=True)
    drawn_dir.mkdir(parents=True, exist_ok=True)

    # Pictures from the world the checkpoint was trained on, fresh from a fixed seed: the first of each shape.
    pool = samples(60, seed=2024 + seed)
    pictures = [next(p for p in pool if p.shape == shape) for shape in SHAPES]
    items, expected, paths = [], [], []
    for i, picture in enumerate(pictures):
        path = images_dir / f"{i}_{picture.colour}_{picture.shape}.png"
        picture.image().save(path)
        for question in (COLOUR_QUESTION, SHAPE_QUESTION, DESCRIBE_QUESTION):
            items.append((question, [str(path)]))
            expected.append(picture.answer(question))
            paths.append(str(path))

    failures = 0
    owned = engine is None
    if owned:
        from emu3_vllm.offline.emu3 import Emu3

        engine = Emu3(shapes_checkpoint(), **engine_kwargs)
    try:
        answers = engine.understand(items, max_new_tokens=max_new_tokens, use_tqdm=False)
        for i, ((question, _), answer, want, path) in enumerate(zip(items, answers, expected, paths)):
            record = {"index": i, "image": path, "question": question, "answer": str(answer), "expected": want}
            if answer.error:
                record["error"] = answer.error
                failures += 1
            emit(record)

        captions = list(DEMO_CAPTIONS)
        seeds = [seed + i for i in range(len(captions))]
        sheet_rows = []
        for scale in CONTACT_SHEET_SCALES:
            results = engine.generate_images(captions, height=SIZE, width=SIZE, cfg_scale=scale, seed=seeds,
                                             use_tqdm=False)
            sheet_rows.append([r.image for r in results])
            if scale != 3.0:  # Emu3's official scale: the drawn PNGs
                continue
            for text, result in zip(captions, results):
                record = {"prompt": text, "cfg_scale": scale, "seed": result.seed}
                if result.error:
                    record["error"] = result.error
                    failures += 1
                else:
                    path = drawn_dir / f"{text.replace(' ', '_')}.png"
                    result.image.save(path)
                    # What the world's pixel classifier reads back from the drawing.
                    colour, shape = classify(result.image)
                    record.update(image=str(path), read_back=caption(colour, shape) if colour else "(blank)")
                emit(record)
        from emu3_vllm.offline.previews import ImagePreview

        # One caption drawn again with previews: the rows drawn so far, as a streamed request shows them.
        preview_row, preview_labels = [], []
        for _, item in engine.iter_images([PREVIEW_CAPTION], height=SIZE, width=SIZE, seed=seed, previews=3):
            preview_row.append(item.image)
            preview_labels.append(f"rows {item.rows}/{SIZE // 8}" if isinstance(item, ImagePreview) else "final")
        strip = contact_sheet([preview_row], [PREVIEW_CAPTION], preview_labels, out / "previews.png",
                              title="emu3_vllm: an image's previews while it is drawn, then the image")
        emit({"previews": str(strip)})
    finally:
        if owned:
            engine.close()

    sheet = contact_sheet(sheet_rows, [f"cfg {s:g}" for s in CONTACT_SHEET_SCALES], captions,
                          out / "contact_sheet.png")
    emit({"generated_images": str(drawn_dir), "contact_sheet": str(sheet)})
    print(f"contact sheet (cfg {', '.join(f'{s:g}' for s in CONTACT_SHEET_SCALES)}): {sheet}", file=sys.stderr)
    return 1 if failures else 0
