"""Resumable text-to-image runs into a folder: PNGs plus a JSON-lines manifest, written chunk by chunk.

Every finished image is on disk (PNG, then its manifest line) before the next chunk starts, so a crash loses at
most the chunk in flight; running the same job again skips every index whose manifest entry succeeded and whose
PNG exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"


def image_file(index: int) -> str:
    return f"{index:05d}.png"


def read_prompts(source: str) -> list[Any]:
    """A .jsonl file ({"prompt": ..., optional per-item fields}), a text file (one prompt a line) or a prompt."""
    path = Path(source)
    if not path.is_file():
        return [source]
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in lines]
    return lines


def finished_indices(out: Path) -> set[int]:
    done = set()
    manifest = out / MANIFEST
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not record.get("error") and (out / record.get("file", "")).is_file():
                done.add(record["index"])
    return done


def generate_to_dir(engine, prompts: Sequence[Any], out: str | Path, *, batch: int = 64, seed: int = 0,
                    on_chunk_done: Callable[[list[int]], None] | None = None, use_tqdm: bool = True,
                    **generate_kwargs: Any) -> dict[str, int]:
    """Generate `prompts` into `out`; image i gets seed `seed + i` (so a resumed run makes the same images)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = finished_indices(out)
    todo = [i for i in range(len(prompts)) if i not in done]
    stats = {"skipped": len(done & set(range(len(prompts)))), "written": 0, "failed": 0}
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=not use_tqdm)
    with open(out / MANIFEST, "a") as manifest:
        for start in range(0, len(todo), max(1, batch)):
            chunk = todo[start:start + batch]
            results = engine.generate_images([prompts[i] for i in chunk], seed=[seed + i for i in chunk],
                                             use_tqdm=False, **generate_kwargs)
            for i, result in zip(chunk, results):
                record = {"index": i, "prompt": result.prompt, "seed": result.seed, "height": result.height,
                          "width": result.width}
                if result.error:
                    record["error"] = result.error
                    stats["failed"] += 1
                else:
                    record["file"] = image_file(i)
                    result.image.save(out / record["file"])
                    stats["written"] += 1
                manifest.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                manifest.flush()
            bar.update(len(chunk))
            if on_chunk_done is not None:
                on_chunk_done(chunk)
    bar.close()
    return stats
