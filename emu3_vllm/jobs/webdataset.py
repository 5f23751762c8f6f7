"""Webdataset shards of generated images for large jobs, finished and resumed one shard at a time.

A job of N prompts with shard size K has ceil(N / K) shards; shard s holds the indices [s*K, min((s+1)*K, N)). For
each shard, `out` gets (img2dataset's layout):

- `{s:05d}.tar`: per index, `{index:09d}.png`, `{index:09d}.json` (what defined the image: prompt, seed, size,
  guidance scale, negative prompt, ...; `error` instead of a PNG when the image failed) and `{index:09d}.codes.npy`
  (the (h, w) grid of VQ codes the engine generated: the image's exact content, which the VQ decoder renders to
  pixels up to float rounding that depends on its batch and thread count);
- `{s:05d}.parquet`: the manifest, one row per index with the same fields plus the PNG's size and sha256;
- `{s:05d}_stats.json`, written last: the done marker. It records the shard's counts, the sizes and sha256 of its
  tar and parquet files, and a digest of everything that defines its images.

A shard is the unit of work and of resume. Its files are written under temporary names and renamed into place,
the stats last, so a shard is either finished (all three files, consistent) or not there; a run killed at any
moment loses only the shards it had open. A later run over the same folder skips a shard only when its stats
exist, its files still have the recorded sizes and hashes, and the job's settings for its indices give the
recorded digest; it redoes every other shard whole. It refuses to mix images made with other settings (which
fields differ is read from the parquet manifest) unless told to replace those shards. Images that failed inside a
finished shard stay failed (their rows say why); a job whose inputs were fixed since is a changed job for those
indices only if they had succeeded, so the shard is simply redone. A folder holds one output format: one with a
folder-of-PNGs `manifest.jsonl` is refused.

A write that fails mid-run (disk full, a file-size limit, permissions) raises `files.WriteError` naming the shard's
file, after the shard's temporary files were removed: the folder is left as a kill would leave it.

`WebdatasetSink` is a `job.GenerationJob`'s sink: one engine's window spans shard boundaries, and the Ray replicas
(`ray_replicas`) write their shards through it too. `--num-shards S --shard-index i` gives process i the shards s
with s % S == i.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tarfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emu3_vllm.cfg_pairs import ImageSpec
from emu3_vllm.jobs.files import OutputError, WriteError, file_sha256, model_identity, png_bytes, prepare_folder
from emu3_vllm.jobs.files import intact as file_intact
from emu3_vllm.jobs.image_folder import MANIFEST
from emu3_vllm.jobs.job import JobItem, Plan
from emu3_vllm.settings import IMAGE_FIELDS, field_kind

SHARD_FORMAT = "emu3_vllm-webdataset-1"
DEFAULT_SHARD_SIZE = 1000

_ARROW_TYPES = {int: "int64", float: "float64", str: "string"}  # int64 holds every seed and top-k the settings allow
# What defines an image (compared on resume): the model and the image settings.
DEFINING = ("model", *IMAGE_FIELDS)
# Manifest columns, typed so that a shard whose rows are all failures still has the full schema; the last three
# describe the image's file.
MANIFEST_COLUMNS = (("key", "string"), ("index", "int64"), ("model", "string"),
                    *((name, _ARROW_TYPES[field_kind(name)]) for name in IMAGE_FIELDS),
                    ("error", "string"), ("bytes", "int64"), ("sha256", "string"))


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def image_key(index: int) -> str:
    return f"{index:09d}"


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet), or an OutputError saying how to get them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise OutputError("--format webdataset writes parquet manifests and needs pyarrow (pip install pyarrow, or "
                          "emu3-vllm[ray])") from None
    return pyarrow, pyarrow.parquet


# --------------------------------------------------------------------------------------------------------------
# Items as the manifest records them, and as the rows a Ray replica receives


def prompt_text(prompt: Any) -> str | None:
    """A prompt as given, for the manifest's string column: text as is; None where the item's prompt is null or
    missing (a JSON null in the tar's JSON, a null in the parquet); any other value as JSON text; text that is not
    valid Unicode (lone surrogates, which no UTF-8 file holds) with those characters backslash-escaped."""
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        prompt = json.dumps(prompt, ensure_ascii=False, default=str)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        prompt = prompt.encode("utf-8", "backslashreplace").decode("utf-8")
    return prompt


def item_record(item: JobItem, model: str) -> dict:
    """What defines an item's image, as the manifest stores and a resume compares it."""
    if item.spec is not None:
        return {"index": item.index, "model": model, **item.spec.record()}
    return {"index": item.index, "model": model, "prompt": prompt_text(item.prompt), "error": item.error}


def _record_line(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def records_digest(records: Iterable[dict]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(_record_line(record))
    return digest.hexdigest()


# A Ray dataset row: one item of one shard, typed so that every block has the same schema.
ROW_COLUMNS = (("shard", "int64"), ("shard_items", "int64"), ("index", "int64"), ("error", "string"),
               *((name, _ARROW_TYPES[field_kind(name)]) for name in IMAGE_FIELDS))


def item_row(item: JobItem, shard: int, shard_items: int) -> dict:
    """An item as a flat row: its settings, or its prompt and error."""
    row = {"shard": shard, "shard_items": shard_items, "index": item.index, "error": item.error,
           **dict.fromkeys(IMAGE_FIELDS)}
    if item.spec is not None:
        row.update(item.spec.record())
    else:
        row["prompt"] = prompt_text(item.prompt)
    return row


def item_of_row(row: dict) -> JobItem:
    if row.get("error") is not None:
        return JobItem(int(row["index"]), row["prompt"], None, row["error"])
    spec = ImageSpec.from_record(row)
    return JobItem(int(row["index"]), spec.prompt, spec)


# --------------------------------------------------------------------------------------------------------------
# Writing one shard


def _npy_bytes(codes) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(codes, dtype=np.int32))
    return buffer.getvalue()


class ShardWriter:
    """One shard being written: the tar grows under a temporary name as images arrive; `finish` writes the parquet
    manifest and the stats under temporary names too, then renames them into place, the stats last. A write that
    fails removes the shard's temporary files and raises `WriteError` naming the shard's file."""

    def __init__(self, out: Path, shard: int, size: int, model: str):
        self.out = Path(out)
        self.shard = shard
        self.size = size
        self.model = model
        self.items: dict[int, JobItem] = {}
        self._digest = hashlib.sha256()  # of the items' records, in index order (as `records_digest`)
        self.rows: dict[int, dict] = {}
        self.started = time.time()
        self._token = uuid.uuid4().hex[:12]
        self._tar_tmp = self._tmp("tar")
        try:
            self._tar = tarfile.open(self._tar_tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - open per shard
        except OSError as exc:
            self._tar_tmp.unlink(missing_ok=True)
            raise WriteError.of(self._final("tar"), exc) from exc

    def _tmp(self, kind: str) -> Path:
        return self.out / f".{shard_name(self.shard)}.{kind}.{self._token}.tmp"

    def _final(self, kind: str) -> Path:
        return self.out / (f"{shard_name(self.shard)}_stats.json" if kind == "stats"
                           else f"{shard_name(self.shard)}.{kind}")

    def expect(self, item: JobItem) -> None:
        """An item of this shard; items come in index order, each before its result."""
        self.items[item.index] = item
        self._digest.update(_record_line(item_record(item, self.model)))

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.size

    @property
    def failed(self) -> int:
        return sum(row["error"] is not None for row in self.rows.values())

    def add(self, index: int, result) -> dict:
        """Put one result (a `GeneratedImage`) in the shard; returns its manifest row."""
        item = self.items[index]
        if index in self.rows:
            raise ValueError(f"item {index} is already in shard {self.shard}")
        row = {name: None for name, _ in MANIFEST_COLUMNS}
        row.update(item_record(item, self.model))
        row.update(key=image_key(index), error=result.error)
        if result.error is None:
            data = png_bytes(result.image)
            row.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            self._member(f"{row['key']}.png", data)
        # A null prompt (an item without one) is said as null, as the error is: both explain a failed item.
        meta = {name: value for name, value in row.items() if value is not None or name in ("error", "prompt")}
        self._member(f"{row['key']}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        if result.error is None and result.codes is not None:
            self._member(f"{row['key']}.codes.npy", _npy_bytes(result.codes))
        self.rows[index] = row
        return row

    def _member(self, name: str, data: bytes) -> None:
        import io

        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o644
        try:
            self._tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            self.discard()
            raise WriteError.of(self._final("tar"), exc) from exc

    def finish(self, **extra) -> dict:
        """Write the manifest, move the files into place, then the stats (the done marker); returns the stats."""
        pa, pq = pyarrow_modules()
        if not self.complete:
            raise ValueError(f"shard {self.shard} holds {len(self.rows)} of its {self.size} items")
        rows = [self.rows[i] for i in sorted(self.rows)]
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in MANIFEST_COLUMNS])
        kind = "tar"
        try:
            self._tar.close()
            table = pa.Table.from_pylist(rows, schema=schema)
            kind = "parquet"
            pq.write_table(table, self._tmp("parquet"))
            files = {part: {"name": self._final(part).name, "bytes": self._tmp(part).stat().st_size,
                            "sha256": file_sha256(self._tmp(part))} for part in ("tar", "parquet")}
            seconds = time.time() - self.started
            successes = len(rows) - self.failed
            stats = {"format": SHARD_FORMAT, "shard": self.shard, "first_index": rows[0]["index"],
                     "last_index": rows[-1]["index"], "count": len(rows), "successes": successes,
                     "failed": self.failed, "model": self.model, "records_sha256": self._digest.hexdigest(),
                     "files": files,
                     "seconds": round(seconds, 3),
                     "images_per_s": round(successes / seconds, 3) if seconds > 0 else None,
                     "worker": f"{socket.gethostname()}:{os.getpid()}", **extra}
            kind = "stats"
            self._tmp(kind).write_text(json.dumps(stats, indent=1, ensure_ascii=False))
            # Every file is written before any is renamed: a full disk fails a write, never a rename, so it leaves
            # no finished-looking tar or parquet without its stats.
            for kind in ("tar", "parquet", "stats"):
                os.replace(self._tmp(kind), self._final(kind))
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError) and not isinstance(exc, WriteError):
                raise WriteError.of(self._final(kind), exc) from exc
            raise
        return stats

    def discard(self) -> None:
        """Drop what was written (the shard is redone whole by a later run); safe to call again."""
        # Closing writes the tar's end blocks, which fails on the full disk that brought us here; the file is closed
        # all the same, and removed below.
        with contextlib.suppress(OSError):
            self._tar.close()
        for kind in ("tar", "parquet", "stats"):
            self._tmp(kind).unlink(missing_ok=True)


class WebdatasetSink:
    """The shards of one output folder, read, planned and written; see the module docstring. `num_shards` and
    `shard_index` select this process's share of the shards."""

    def __init__(self, out: str | Path, model: str, *, shard_size: int = DEFAULT_SHARD_SIZE, num_shards: int = 1,
                 shard_index: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard size must be a positive integer, got {shard_size}")
        if num_shards < 1:
            raise ValueError(f"--num-shards must be a positive integer, got {num_shards}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
        pyarrow_modules()
        self.out = prepare_folder(out)
        if (self.out / MANIFEST).exists():  # neither resume rule would know the other's files
            raise OutputError(f"--out {self.out} holds a folder of PNGs ({MANIFEST}); use another --out for "
                              "webdataset shards, or --format folder")
        self.model = model_identity(model)
        self.shard_size = shard_size
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.sizes: dict[int, int] = {}  # items per shard, for the shards this process makes
        self.finished: list[dict] = []  # the stats of each shard finished
        self.stats: dict[str, Any] = {"out": str(self.out), "format": "webdataset", "images": 0, "skipped": 0,
                                      "written": 0, "failed": 0, "regenerated": 0, "shards": 0, "skipped_shards": 0,
                                      "written_shards": 0}
        self._todo: set[int] = set()
        self._open: dict[int, ShardWriter] = {}

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def mine(self, shard: int) -> bool:
        return shard % self.num_shards == self.shard_index

    # ----------------------------------------------------------------------------------------------------------
    # Reading and planning

    def shard_stats(self, shard: int) -> dict | None:
        path = self.out / f"{shard_name(shard)}_stats.json"
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return stats if isinstance(stats, dict) and stats.get("format") == SHARD_FORMAT else None

    def intact(self, stats: dict) -> bool:
        """Whether every file a finished shard's stats name still has the size and hash they give it."""
        try:
            return all(file_intact(self.out / info["name"], info["bytes"], info["sha256"])
                       for info in stats["files"].values())
        except (KeyError, TypeError, AttributeError):  # stats of another shape
            return False

    def manifest(self, shard: int) -> dict[int, dict]:
        """The manifest rows of a finished shard by index (empty if it cannot be read)."""
        _, pq = pyarrow_modules()
        try:
            rows = pq.read_table(self.out / f"{shard_name(shard)}.parquet").to_pylist()
        except Exception:  # noqa: BLE001 - an unreadable manifest means an unfinished shard
            return {}
        return {int(row["index"]): row for row in rows}

    def check_layout(self, shard_size: int, num_shards: int) -> None:
        """Refuse a folder whose finished shards cut the indices differently: redoing some of them would leave
        others holding the same indices twice."""
        for path in sorted(self.out.glob("*_stats.json")):
            try:
                shard = int(path.name.split("_", 1)[0])
            except ValueError:
                continue
            stats = self.shard_stats(shard)
            if stats is None:
                continue
            if stats.get("shard_size") != shard_size:
                raise OutputError(f"{self.out} holds shards of {stats.get('shard_size')} images "
                                  f"({path.name}); use --shard-size {stats.get('shard_size')} or another --out")
            if shard >= num_shards:
                raise OutputError(f"{self.out} holds shard {shard_name(shard)}, beyond this job's {num_shards} "
                                  "shard(s): it was made from another prompt list; use another --out")

    def clean(self, shard: int) -> None:
        """Remove what a killed run left of a shard it had open."""
        for stale in self.out.glob(f".{shard_name(shard)}.*.tmp"):
            stale.unlink(missing_ok=True)

    def plan(self, items: Iterable[JobItem]) -> Plan:
        """Sort this process's shards: one is skipped only when its stats exist, its files still have the recorded
        sizes and hashes, and this job's items give the recorded digest."""
        plan = Plan("shard")
        group: list[JobItem] = []
        count = 0
        for item in items:
            count += 1
            shard = self.shard_of(item.index)
            if group and shard != self.shard_of(group[-1].index):
                self._plan_shard(group, plan)
                group = []
            if self.mine(shard):
                group.append(item)
        if group:
            self._plan_shard(group, plan)
        self.check_layout(self.shard_size, -(-count // self.shard_size))

        def images(shards) -> int:
            return sum(self.sizes[s] for s in shards)

        self.stats.update(images=images(self.sizes), skipped=images(plan.skipped),
                          regenerated=images(list(plan.changed) + plan.corrupt), shards=len(self.sizes),
                          skipped_shards=len(plan.skipped))
        return plan

    def _plan_shard(self, items: list[JobItem], plan: Plan) -> None:
        shard = self.shard_of(items[0].index)
        self.sizes[shard] = len(items)
        drawn = any(item.spec is not None for item in items)
        stats = self.shard_stats(shard)
        if stats is None:
            plan.todo.append(shard)
            plan.todo_needs_engine |= drawn
            return
        if stats.get("records_sha256") == records_digest(item_record(item, self.model) for item in items):
            if self.intact(stats):
                plan.skipped.append(shard)
            else:
                plan.corrupt.append(shard)
                plan.todo.append(shard)
                plan.todo_needs_engine |= drawn
            return
        old = self.manifest(shard)
        differs: set[str] = set()
        for item in items:
            row = old.get(item.index)
            if row is None or row.get("error") is not None:
                continue  # not made before, or failed before: redoing it mixes nothing
            new = item_record(item, self.model)
            differs.update(name for name in DEFINING if row.get(name) != new.get(name))
        if differs:
            plan.changed[shard] = sorted(differs)
            plan.changed_needs_engine |= drawn
        else:
            plan.todo.append(shard)
            plan.todo_needs_engine |= drawn

    # ----------------------------------------------------------------------------------------------------------
    # Writing

    def start(self, todo: list[int]) -> None:
        self._todo = set(todo)
        for shard in todo:
            self.clean(shard)

    def expect(self, shard: int, size: int) -> None:
        """Make `shard`, of `size` items: a Ray replica, which plans nothing, is told each shard it receives."""
        self.sizes[shard] = size
        self._todo.add(shard)

    def wants(self, index: int) -> bool:
        return self.shard_of(index) in self._todo

    def add(self, item: JobItem) -> None:
        shard = self.shard_of(item.index)
        if shard not in self._open:
            self._open[shard] = ShardWriter(self.out, shard, self.sizes[shard], self.model)
        self._open[shard].expect(item)

    def write(self, item: JobItem, result) -> None:
        shard = self.shard_of(item.index)
        writer = self._open[shard]
        writer.add(item.index, result)
        if writer.complete:
            del self._open[shard]
            self.count(writer.finish(shard_size=self.shard_size))

    def count(self, shard_stats: dict) -> None:
        """A finished shard: one of this process's, or one a Ray replica reports."""
        self.finished.append(shard_stats)
        self.stats["written"] += shard_stats["successes"]
        self.stats["failed"] += shard_stats["failed"]
        self.stats["written_shards"] += 1

    def close(self) -> None:
        if self._open:
            raise RuntimeError(f"the run ended with shards {sorted(self._open)} unfinished")

    def discard(self) -> None:
        for writer in self._open.values():
            writer.discard()
        self._open.clear()

    def postfix(self) -> dict:
        return {"shards": f"{self.stats['written_shards']}/{len(self._todo)}", "failed": self.stats["failed"]}
