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

A write that fails mid-run (disk full, a file-size limit, permissions) raises `image_folder.WriteError` naming the
shard's file, after the shard's temporary files were removed: the folder is left as a kill would leave it.

`ShardJob` plans a job (every item checked, before any engine starts) and generates its shards through one
engine, its window spanning shard boundaries; `generate_shards` is the writing loop that the Ray replicas
(`ray_generation`) run as well. `--num-shards S --shard-index i` gives process i the shards s with s % S == i.
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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu3_vllm.cfg_pairs import ImageSpec
from emu3_vllm.jobs.image_folder import (
    MANIFEST,
    ChangedSettingsError,
    OutputError,
    WriteError,
    _png_bytes,
    _sha256,
    model_identity,
    prepare_folder,
)
from emu3_vllm.jobs.prompt_source import given_prompt

SHARD_FORMAT = "emu3_vllm-webdataset-1"
DEFAULT_SHARD_SIZE = 1000

# Manifest columns, typed so that a shard whose rows are all failures still has the full schema. int64 holds every
# seed and top-k the settings allow (seeds are int64, negative ones included).
MANIFEST_COLUMNS = (("key", "string"), ("index", "int64"), ("model", "string"), ("prompt", "string"),
                    ("height", "int64"), ("width", "int64"), ("cfg_scale", "float64"), ("seed", "int64"),
                    ("negative_prompt", "string"), ("positive_suffix", "string"), ("top_k", "int64"),
                    ("temperature", "float64"), ("error", "string"), ("bytes", "int64"), ("sha256", "string"))
# What defines an image (compared on resume); the rest of a row describes its file.
DEFINING = ("model", "prompt", "height", "width", "cfg_scale", "seed", "negative_prompt", "positive_suffix",
            "top_k", "temperature")


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def image_key(index: int) -> str:
    return f"{index:09d}"


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    if shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {shard_size}")
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


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
# Items and their records


@dataclass(frozen=True)
class ShardItem:
    """One index of a job: its spec, or why its input could not be turned into one."""

    index: int
    prompt: str | None  # the prompt as text; for an unreadable item see `prompt_text`
    spec: ImageSpec | None
    error: str | None = None

    def record(self, model: str) -> dict:
        """What defines this item's image, as the manifest stores and a resume compares it."""
        if self.spec is not None:
            return {"index": self.index, "model": model, **self.spec.record()}
        return {"index": self.index, "model": model, "prompt": self.prompt, "error": self.error}

    def to_row(self, shard: int) -> dict:
        """A flat row (for a Ray dataset): the spec's fields, or the input error."""
        spec = self.spec
        row = {"shard": shard, "index": self.index, "prompt": self.prompt, "error": self.error}
        for name in ("h", "w", "cfg_scale", "seed", "negative_prompt", "positive_suffix", "top_k", "temperature"):
            row[name] = getattr(spec, name) if spec is not None else None
        return row

    @classmethod
    def from_row(cls, row: dict) -> ShardItem:
        if row.get("error") is not None or row.get("h") is None:
            return cls(int(row["index"]), row["prompt"], None, row.get("error") or "no spec")
        spec = ImageSpec(prompt=row["prompt"], h=int(row["h"]), w=int(row["w"]), cfg_scale=float(row["cfg_scale"]),
                         seed=int(row["seed"]), negative_prompt=row["negative_prompt"],
                         positive_suffix=row["positive_suffix"], top_k=int(row["top_k"]),
                         temperature=float(row["temperature"]))
        return cls(int(row["index"]), row["prompt"], spec)


def prompt_text(item: Any) -> str | None:
    """An item's prompt for the manifest's string column: the text as given; None where the item's prompt is null or
    missing (a JSON null in the tar's JSON, a null in the parquet); any other value as JSON text; text that is not
    valid Unicode (lone surrogates, which no UTF-8 file holds) with those characters backslash-escaped."""
    prompt = given_prompt(item)
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        prompt = json.dumps(prompt, ensure_ascii=False, default=str)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        prompt = prompt.encode("utf-8", "backslashreplace").decode("utf-8")
    return prompt


def records_digest(records: Iterable[dict]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    return digest.hexdigest()


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

    def __init__(self, out: Path, shard: int, items: list[ShardItem], model: str):
        self.out = Path(out)
        self.shard = shard
        self.model = model
        self.items = {item.index: item for item in items}
        self.digest = records_digest(item.record(model) for item in sorted(items, key=lambda i: i.index))
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

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.items)

    @property
    def failed(self) -> int:
        return sum(row["error"] is not None for row in self.rows.values())

    def add(self, index: int, result) -> dict:
        """Put one result (a `GeneratedImage`) in the shard; returns its manifest row."""
        item = self.items[index]
        if index in self.rows:
            raise ValueError(f"item {index} is already in shard {self.shard}")
        row = {name: None for name, _ in MANIFEST_COLUMNS}
        row.update(item.record(self.model))
        row.update(key=image_key(index), error=result.error)
        if result.error is None:
            data = _png_bytes(result.image)
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
            missing = sorted(set(self.items) - set(self.rows))
            raise ValueError(f"shard {self.shard} is missing items {missing[:8]}")
        rows = [self.rows[i] for i in sorted(self.rows)]
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in MANIFEST_COLUMNS])
        kind = "tar"
        try:
            self._tar.close()
            table = pa.Table.from_pylist(rows, schema=schema)
            kind = "parquet"
            pq.write_table(table, self._tmp("parquet"))
            files = {part: {"name": self._final(part).name, "bytes": self._tmp(part).stat().st_size,
                            "sha256": _sha256(self._tmp(part))} for part in ("tar", "parquet")}
            seconds = time.time() - self.started
            successes = len(rows) - self.failed
            stats = {"format": SHARD_FORMAT, "shard": self.shard, "first_index": rows[0]["index"],
                     "last_index": rows[-1]["index"], "count": len(rows), "successes": successes,
                     "failed": self.failed, "model": self.model, "records_sha256": self.digest, "files": files,
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


@dataclass
class ShardRunStats:
    """What one pass of `generate_shards` did."""

    images: int = 0  # images written (successes)
    failed: int = 0
    shards: list[dict] = field(default_factory=list)  # the stats of each shard finished
    started: float = field(default_factory=time.perf_counter)


class _Feed:
    """The good items of a shard sequence as the two lazily read iterables `Emu3.iter_images(prompts, indices=...)`
    takes (it reads one prompt, then its index); bad items go straight to their shard."""

    def __init__(self, shards: Iterable[tuple[int, list[ShardItem]]], opened: Callable[[int, list[ShardItem]], None],
                 failed: Callable[[ShardItem], None]):
        self._shards = shards
        self._opened = opened
        self._failed = failed
        self._indices: deque[int] = deque()

    def specs(self) -> Iterator[ImageSpec]:
        for shard, items in self._shards:
            self._opened(shard, items)
            for item in items:
                if item.spec is None:
                    self._failed(item)
                else:
                    self._indices.append(item.index)
                    yield item.spec

    def indices(self) -> Iterator[int]:
        while True:
            yield self._indices.popleft()  # pushed just before its spec was handed out


def generate_shards(engine, out: str | Path, model: str, shards: Iterable[tuple[int, list[ShardItem]]], *,
                    shard_size: int, max_in_flight: int | None = None, on_result=None,
                    on_shard=None) -> ShardRunStats:
    """Generate `shards` ((shard, items) pairs, read lazily) through `engine` (an `Emu3`; None when no item needs
    one) into `out`; each shard is finished the moment its last image is decoded. Whatever stops the run early
    discards the shards still open."""
    from emu3_vllm.offline.image_stream import StreamStats
    from emu3_vllm.offline.results import GeneratedImage

    out = Path(out)
    run = ShardRunStats()
    writers: dict[int, ShardWriter] = {}
    shard_of: dict[int, int] = {}

    def opened(shard: int, items: list[ShardItem]) -> None:
        writers[shard] = ShardWriter(out, shard, items, model)
        for item in items:
            shard_of[item.index] = shard
        if not items:
            finish(shard)

    def keep(index: int, result) -> None:
        shard = shard_of.pop(index)
        writers[shard].add(index, result)
        if result.error is None:
            run.images += 1
        else:
            run.failed += 1
        if on_result is not None:
            on_result(index, result)
        if writers[shard].complete:
            finish(shard)

    def finish(shard: int) -> None:
        stats = writers.pop(shard).finish(shard_size=shard_size)
        run.shards.append(stats)
        if on_shard is not None:
            on_shard(stats)

    feed = _Feed(shards, opened, lambda item: keep(item.index, GeneratedImage.failed(item.prompt, item.error)))
    try:
        if engine is None:
            for spec in feed.specs():
                raise RuntimeError(f"{spec.prompt!r} needs an engine")
        else:
            # Closed on any exit (a failed write included), so the images still in the engine are aborted now.
            with contextlib.closing(engine.iter_images(feed.specs(), indices=feed.indices(),
                                                       max_in_flight=max_in_flight, stats=StreamStats())) as images:
                for index, result in images:
                    keep(index, result)
        if writers:
            raise RuntimeError(f"the stream ended with shards {sorted(writers)} unfinished")
    finally:
        for writer in writers.values():
            writer.discard()
    return run


# --------------------------------------------------------------------------------------------------------------
# Reading a folder of shards back, and planning a job over it


@dataclass
class ShardPlan:
    """What a run does with each of its shards."""

    todo: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)  # finished, but its files are not those its stats describe
    changed: dict[int, list[str]] = field(default_factory=dict)  # finished with other settings: the fields

    def describe_changed(self, limit: int = 8) -> str:
        fields = sorted({name for names in self.changed.values() for name in names})
        shards = sorted(self.changed)
        shown = ", ".join(map(shard_name, shards[:limit])) + (f" and {len(shards) - limit} more"
                                                                if len(shards) > limit else "")
        return f"{len(shards)} shard(s) with images made with other {', '.join(fields)}: {shown}"


class ShardFolder:
    """The shards of one output folder; see the module docstring."""

    def __init__(self, out: str | Path, model: str):
        self.out = prepare_folder(out)
        if (self.out / MANIFEST).exists():  # neither resume rule would know the other's files
            raise OutputError(f"--out {self.out} holds a folder of PNGs ({MANIFEST}); use another --out for "
                              "webdataset shards, or --format folder")
        self.model = model_identity(model)

    def stats(self, shard: int) -> dict | None:
        path = self.out / f"{shard_name(shard)}_stats.json"
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return stats if isinstance(stats, dict) and stats.get("format") == SHARD_FORMAT else None

    def intact(self, stats: dict) -> bool:
        try:
            for info in stats["files"].values():
                path = self.out / info["name"]
                if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
                    return False
        except (OSError, KeyError, TypeError, AttributeError):
            return False
        return True

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
            stats = self.stats(shard)
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

    def plan_shard(self, shard: int, items: list[ShardItem], plan: ShardPlan) -> None:
        stats = self.stats(shard)
        if stats is None:
            plan.todo.append(shard)
            return
        digest = records_digest(item.record(self.model) for item in items)
        if stats.get("records_sha256") == digest:
            if self.intact(stats):
                plan.skipped.append(shard)
            else:
                plan.corrupt.append(shard)
                plan.todo.append(shard)
            return
        old = self.manifest(shard)
        differs: set[str] = set()
        for item in items:
            row = old.get(item.index)
            if row is None or row.get("error") is not None:
                continue  # not made before, or failed before: redoing it mixes nothing
            new = item.record(self.model)
            differs.update(name for name in DEFINING if row.get(name) != new.get(name))
        if differs:
            plan.changed[shard] = sorted(differs)
        else:
            plan.todo.append(shard)


class ShardJob:
    """Generating a list of prompts into webdataset shards in `out`: image i gets seed `seed + i` unless its item
    says otherwise, so a re-run (or a run after a kill) makes the same images. Everything that needs no engine
    (checking every item, reading the folder, comparing settings) happens in the constructor, so a front end can
    refuse before it starts an engine. `num_shards`/`shard_index` select this process's share of the shards."""

    def __init__(self, out: str | Path, model: str, prompts: list, defaults, seed: int,
                 shard_size: int = DEFAULT_SHARD_SIZE, regenerate_changed: bool = False, num_shards: int = 1,
                 shard_index: int = 0):
        if num_shards < 1:
            raise ValueError(f"--num-shards must be a positive integer, got {num_shards}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
        pyarrow_modules()
        self.folder = ShardFolder(out, model)
        self.model = self.folder.model
        self.prompts = prompts
        self.defaults = defaults
        self.seed = seed
        self.shard_size = shard_size
        self.ranges = shard_ranges(len(prompts), shard_size)
        self.folder.check_layout(shard_size, len(self.ranges))
        self.shards = [s for s in range(len(self.ranges)) if s % num_shards == shard_index]
        self.plan = ShardPlan()
        self._good: dict[int, int] = {}  # items that need the engine, per shard
        for shard in self.shards:
            items = self.items(shard)
            self._good[shard] = sum(item.spec is not None for item in items)
            self.folder.plan_shard(shard, items, self.plan)
        if self.plan.changed and not regenerate_changed:
            raise ChangedSettingsError(f"{out} already holds {self.plan.describe_changed()}; use another --out, "
                                       "or --regenerate-changed to redo those shards")
        self.todo = sorted(self.plan.todo + list(self.plan.changed))
        for shard in self.todo:
            self.folder.clean(shard)

        def size(shards):
            return sum(len(self.ranges[s]) for s in shards)

        self.stats = {"out": str(out), "format": "webdataset", "images": size(self.shards),
                      "skipped": size(self.plan.skipped), "written": 0, "failed": 0,
                      "regenerated": size(list(self.plan.changed) + self.plan.corrupt), "shards": len(self.shards),
                      "skipped_shards": len(self.plan.skipped), "written_shards": 0}

    def items(self, shard: int) -> list[ShardItem]:
        """The shard's items, each checked (a bad one carries its error, naming its index)."""
        from emu3_vllm.offline.items import ItemError, image_spec

        items = []
        for index in self.ranges[shard]:
            prompt = self.prompts[index]
            try:
                spec = image_spec(prompt, where=f"item {index}", defaults=self.defaults, seed=self.seed + index)
                items.append(ShardItem(index, spec.prompt, spec))
            except ItemError as exc:
                items.append(ShardItem(index, prompt_text(prompt), None, str(exc)))
        return items

    def todo_shards(self) -> Iterator[tuple[int, list[ShardItem]]]:
        for shard in self.todo:
            yield shard, self.items(shard)

    @property
    def needs_engine(self) -> bool:
        return any(self._good[s] for s in self.todo)

    def count(self, shard_stats: dict) -> None:
        self.stats["written"] += shard_stats["successes"]
        self.stats["failed"] += shard_stats["failed"]
        self.stats["written_shards"] += 1

    def run(self, engine, *, max_in_flight: int | None = None, progress: bool = True, on_result=None) -> dict:
        """Generate the shards left to do through one engine; each shard lands in `out` the moment it is complete.
        Returns the stats."""
        from tqdm import tqdm

        todo_images = sum(len(self.ranges[s]) for s in self.todo)
        started = time.perf_counter()
        with tqdm(total=todo_images, desc="images", unit="img", dynamic_ncols=True,
                  disable=not progress or not todo_images) as bar:
            def result(index: int, image) -> None:
                bar.update(1)
                if on_result is not None:
                    on_result(index, image)

            def shard_done(stats: dict) -> None:
                self.count(stats)
                bar.set_postfix(shards=f"{self.stats['written_shards']}/{len(self.todo)}",
                                failed=self.stats["failed"], refresh=False)

            try:
                generate_shards(engine, self.folder.out, self.model, self.todo_shards(), shard_size=self.shard_size,
                                max_in_flight=max_in_flight, on_result=result, on_shard=shard_done)
            finally:
                seconds = time.perf_counter() - started
                self.stats.update(seconds=round(seconds, 3),
                                  images_per_s=round(self.stats["written"] / seconds, 3) if seconds > 0 else None)
        return self.stats
