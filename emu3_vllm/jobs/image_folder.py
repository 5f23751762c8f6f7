"""A folder of generated images that is always consistent and resumes safely: PNGs plus `manifest.jsonl`.

Each image is written the moment it is ready: the PNG goes to a temporary name and is renamed into place, then its
manifest line is appended. So the manifest never names a missing or partial file, and a run killed at any moment
loses only the images in flight. A manifest line records everything that defines its image (model, prompt, size,
guidance scale, negative prompt, seed, top-k, temperature) and the PNG's size and sha256. A later run over the same
folder skips an image only when its line matches the job's settings for that index and the file still matches its
size and hash; it regenerates a file that does not match, and refuses to mix images made with other settings
unless told to replace them. A folder holds one output format: one with webdataset shards is refused.

A write that fails mid-run (disk full, a file-size limit, permissions) raises `files.WriteError` naming the file, after
the writer removed its temporary file and cut back a manifest line it had only half appended: the folder is left as
a kill would leave it, and a re-run continues from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emu3_vllm.jobs.files import (
    OutputError,
    WriteError,
    append_whole,
    intact,
    model_identity,
    png_bytes,
    prepare_folder,
)
from emu3_vllm.jobs.job import JobItem, Plan

MANIFEST = "manifest.jsonl"

# What `webdataset.WebdatasetSink` leaves in a folder (matched by name: that module imports this one).
_SHARD_FILE = re.compile(r"\d{5,}(_stats\.json|\.tar|\.parquet)")


def image_file(index: int) -> str:
    return f"{index:05d}.png"


class ImageFolderSink:
    """The PNGs and manifest of one output folder; see the module docstring."""

    def __init__(self, out: str | Path, model: str):
        self.out = prepare_folder(out)
        found = sorted(path.name for path in self.out.iterdir() if _SHARD_FILE.fullmatch(path.name))
        if found:  # neither resume rule would know the other's files, and readers would find a mixture
            raise OutputError(f"--out {self.out} holds webdataset shards ({found[0]}); use another --out for a "
                              "folder of PNGs, or --format webdataset")
        self.model = model_identity(model)
        self.manifest_path = self.out / MANIFEST
        for stale in self.out.glob(".*.png.tmp*"):  # a run killed between writing and renaming
            stale.unlink(missing_ok=True)
        self._heal_manifest()
        self._todo: set[int] = set()
        self.stats: dict[str, Any] = {}

    def _heal_manifest(self) -> None:
        """Give the manifest a whole last line. A run killed during an append leaves one without its newline, and
        the next append would glue two records into a line no JSON reader accepts. A cut record is dropped (`records`
        ignores it anyway, so the plan is unchanged and its image is made again); a record cut just before its newline
        is whole, and only gets the newline."""
        try:
            with open(self.manifest_path, "r+b") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = size
                while start > 0:  # back to the last newline; one block is one line or more in practice
                    block = min(start, 1 << 16)
                    fh.seek(start - block)
                    newline = fh.read(block).rfind(b"\n")
                    if newline >= 0:
                        start = start - block + newline + 1
                        break
                    start -= block
                if start == size:
                    return
                fh.seek(start)
                try:
                    json.loads(fh.read().decode("utf-8"))
                    fh.write(b"\n")
                except ValueError:  # not JSON, or not UTF-8: a cut record
                    fh.truncate(start)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutputError(f"{self.manifest_path}: cannot repair its cut last line ({exc.strerror or exc})") \
                from exc

    def records(self) -> dict[int, dict]:
        """The latest manifest line of each index (a line cut short by a kill is ignored)."""
        latest: dict[int, dict] = {}
        if self.manifest_path.exists():
            with open(self.manifest_path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                        latest[int(record["index"])] = record
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue
        return latest

    def plan(self, items: Iterable[JobItem]) -> Plan:
        """Sort the job's indices: an index is skipped only when its latest line has this job's settings for it and
        its file still has the recorded size and hash."""
        plan = Plan("image")
        records = self.records()
        images = 0
        for item in items:
            images += 1
            index, record = item.index, records.get(item.index)
            if record is None or record.get("error") or item.spec is None or "file" not in record:
                plan.todo.append(index)
                plan.todo_needs_engine |= item.spec is not None
                continue
            differs = [name for name, value in self._defining(item.spec).items() if record.get(name) != value]
            if differs:
                plan.changed[index] = differs
                plan.changed_needs_engine = True
            elif not intact(self.out / record["file"], record.get("bytes"), record.get("sha256")):
                plan.corrupt.append(index)
                plan.todo.append(index)
                plan.todo_needs_engine = True
            else:
                plan.skipped.append(index)
        self.stats = {"out": str(self.out), "images": images, "skipped": len(plan.skipped), "written": 0,
                      "failed": 0, "regenerated": len(plan.changed) + len(plan.corrupt)}
        return plan

    def start(self, todo: list[int]) -> None:
        self._todo = set(todo)

    def wants(self, index: int) -> bool:
        return index in self._todo

    def add(self, item: JobItem) -> None:
        pass  # an image is its own unit: nothing to open

    def _defining(self, spec) -> dict:
        return {"model": self.model, **spec.record()}

    def write(self, item: JobItem, result) -> dict:
        """Put one result in the folder (its PNG, then its manifest line); returns the manifest record. A failed
        write raises `WriteError`, leaving no temporary file and no partial line."""
        record: dict[str, Any] = {"index": item.index}
        if result.spec is not None:
            record.update(self._defining(result.spec))
        else:
            record["prompt"] = item.prompt
        if result.error is None:
            name = image_file(item.index)
            data = png_bytes(result.image)
            tmp = self.out / f".{name}.tmp{os.getpid()}"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, self.out / name)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise WriteError.of(self.out / name, exc) from exc
            record.update(file=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        else:
            record["error"] = result.error
        line = json.dumps(record, ensure_ascii=False, default=str)
        try:
            data = (line + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a rejected prompt holding lone surrogates: keep it, \u-escaped
            data = (json.dumps(record, default=str) + "\n").encode("ascii")
        try:
            append_whole(self.manifest_path, data)
        except OSError as exc:
            raise WriteError.of(self.manifest_path, exc) from exc
        self.stats["failed" if result.error else "written"] += 1
        return record

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass  # every line written is whole; an image in flight simply is not there

    def postfix(self) -> dict:
        return {"failed": self.stats["failed"]} if self.stats["failed"] else {}
