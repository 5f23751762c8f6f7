"""A folder of generated images that is always consistent and resumes safely: PNGs plus `manifest.jsonl`.

Each image is written the moment it is ready: the PNG goes to a temporary name and is renamed into place, then its
manifest line is appended. So the manifest never names a missing or partial file, and a run killed at any moment
loses only the images in flight. A manifest line records everything that defines its image (model, prompt, size,
guidance scale, negative prompt, seed, top-k, temperature) and the PNG's size and sha256. A later run over the same
folder skips an image only when its line matches the job's settings for that index and the file still matches its
size and hash; it regenerates a file that does not match, and refuses to mix images made with other settings
unless told to replace them. A folder holds one output format: one with webdataset shards is refused.

A write that fails mid-run (disk full, a file-size limit, permissions) raises `WriteError` naming the file, after
the writer removed its temporary file and cut back a manifest line it had only half appended: the folder is left as
a kill would leave it, and a re-run continues from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"


class OutputError(ValueError):
    """The output folder cannot be used; the message is one line."""


class WriteError(OSError):
    """Writing an output file failed during a run; `filename` is the file as the user knows it (not its temporary
    name) and the message one line. An OSError, as the failure underneath was, so callers catching that still do."""

    @classmethod
    def of(cls, path: str | Path, exc: OSError) -> WriteError:
        return cls(exc.errno, exc.strerror or str(exc), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


# What `shards.ShardWriter` leaves in a folder (matched by name: this module cannot import that one).
_SHARD_FILE = re.compile(r"\d{5,}(_stats\.json|\.tar|\.parquet)")


def refuse_shards(out: Path) -> None:
    """A folder of PNGs is never written into a folder of webdataset shards: neither resume rule would know the
    other's files, and readers of either format would find a mixture."""
    found = sorted(path.name for path in out.iterdir() if _SHARD_FILE.fullmatch(path.name))
    if found:
        raise OutputError(f"--out {out} holds webdataset shards ({found[0]}); use another --out for a folder of "
                          "PNGs, or --format webdataset")


def image_file(index: int) -> str:
    return f"{index:05d}.png"


def model_identity(model: str) -> str:
    """The model as a manifest records it: a local checkpoint by its absolute path, a hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def prepare_folder(out: str | Path) -> Path:
    """Create `out` if needed and prove it writable, before any engine starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc
    return out


@dataclass
class Plan:
    """What a run over an existing folder does with each index of the job."""

    todo: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)  # on disk, but not the file the manifest describes
    changed: dict[int, list[str]] = field(default_factory=dict)  # done with other settings: the fields that differ

    def describe_changed(self, limit: int = 8) -> str:
        fields = sorted({name for names in self.changed.values() for name in names})
        indices = sorted(self.changed)
        shown = ", ".join(map(str, indices[:limit])) + (f" and {len(indices) - limit} more" if len(indices) > limit
                                                          else "")
        return f"{len(indices)} image(s) made with other {', '.join(fields)}: {shown}"


_FROM_RESULT: Any = object()  # `ImageFolder.write`'s prompt when the caller gives none


class ImageFolder:
    """The manifest and PNGs of one output folder; see the module docstring."""

    def __init__(self, out: str | Path, model: str):
        self.out = prepare_folder(out)
        refuse_shards(self.out)
        self.model = model_identity(model)
        self.manifest_path = self.out / MANIFEST
        for stale in self.out.glob(".*.png.tmp*"):  # a run killed between writing and renaming
            stale.unlink(missing_ok=True)
        self._heal_manifest()

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

    def plan(self, specs: Mapping[int, Any]) -> Plan:
        """Sort the job's indices: `specs` maps each index to its `ImageSpec` (None where the item is bad)."""
        plan = Plan()
        records = self.records()
        for index, spec in specs.items():
            record = records.get(index)
            if record is None or record.get("error") or spec is None or "file" not in record:
                plan.todo.append(index)
                continue
            differs = [name for name, value in self._defining(spec).items() if record.get(name) != value]
            if differs:
                plan.changed[index] = differs
            elif not self._intact(record):
                plan.corrupt.append(index)
                plan.todo.append(index)
            else:
                plan.skipped.append(index)
        return plan

    def _defining(self, spec) -> dict:
        return {"model": self.model, **spec.record()}

    def _intact(self, record: dict) -> bool:
        path = self.out / record["file"]
        try:
            if path.stat().st_size != record.get("bytes"):
                return False
            return _sha256(path) == record.get("sha256")
        except OSError:
            return False

    def write(self, index: int, result, prompt: Any = _FROM_RESULT) -> dict:
        """Put one result in the folder (its PNG, then its manifest line); returns the manifest record. `prompt` is
        what an item that never became a spec gave as its prompt (None for a missing or null one), recorded as is.
        A failed write raises `WriteError`, leaving no temporary file and no partial line."""
        record: dict[str, Any] = {"index": index}
        if result.spec is not None:
            record.update(self._defining(result.spec))
        else:
            record["prompt"] = result.prompt if prompt is _FROM_RESULT else prompt
        if result.error is None:
            name = image_file(index)
            data = _png_bytes(result.image)
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
            _append(self.manifest_path, data)
        except OSError as exc:
            raise WriteError.of(self.manifest_path, exc) from exc
        return record


def _append(path: Path, data: bytes) -> None:
    """Append `data` whole or not at all: a write that fails part-way (disk full) is cut back, so the next append
    does not land on a partial line. Only a kill can leave one (see `ImageFolder._heal_manifest`)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, start)  # shrinking needs no space
            except OSError:
                pass  # the next run heals the line instead
            raise
    finally:
        os.close(fd)


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ChangedSettingsError(OutputError):
    """The folder holds images of this job's indices made with other settings."""


class FolderJob:
    """Generating a list of prompts into an `ImageFolder`: image i gets seed `seed + i`, so a re-run (or a run after
    a kill) makes byte-identical images. Everything that needs no engine (reading the folder, checking each item,
    comparing settings) happens in the constructor, so a front end can refuse before it starts an engine."""

    def __init__(self, out: str | Path, model: str, prompts: list, defaults, seed: int,
                 regenerate_changed: bool = False):
        from emu3_vllm.offline.items import ItemError, image_spec

        self.folder = ImageFolder(out, model)
        self.prompts = prompts
        self.specs: dict[int, Any] = {}
        self.errors: dict[int, str] = {}
        for index, prompt in enumerate(prompts):
            try:
                self.specs[index] = image_spec(prompt, where=f"item {index}", defaults=defaults, seed=seed + index)
            except ItemError as exc:
                self.specs[index], self.errors[index] = None, str(exc)
        self.plan = self.folder.plan(self.specs)
        if self.plan.changed and not regenerate_changed:
            raise ChangedSettingsError(f"{out} already holds {self.plan.describe_changed()}; use another --out, "
                                       "or --regenerate-changed to replace them")
        self.todo = sorted(self.plan.todo + list(self.plan.changed))
        self.stats = {"out": str(out), "images": len(prompts), "skipped": len(self.plan.skipped), "written": 0,
                      "failed": 0, "regenerated": len(self.plan.changed) + len(self.plan.corrupt)}

    @property
    def needs_engine(self) -> bool:
        return any(self.specs[i] is not None for i in self.todo)

    def run(self, engine, *, max_in_flight: int | None = None, progress: bool = True, on_result=None) -> dict:
        """Generate what is left; each image lands in the folder the moment it is decoded. Returns the stats.

        A failed write (`WriteError`) stops the run there: everything finished so far stays in the folder and in
        `self.stats`."""
        from tqdm import tqdm

        from emu3_vllm.jobs.prompt_source import given_prompt
        from emu3_vllm.offline.results import GeneratedImage

        def keep(index: int, result) -> None:
            self.folder.write(index, result, given_prompt(self.prompts[index]))
            self.stats["failed" if result.error else "written"] += 1
            if on_result is not None:
                on_result(index, result)

        for index in self.todo:
            if self.specs[index] is None:
                keep(index, GeneratedImage.failed(self.prompts[index], self.errors[index]))
        todo = [i for i in self.todo if self.specs[i] is not None]
        if not todo:
            return self.stats
        from emu3_vllm.offline.image_stream import StreamStats

        stream = StreamStats()
        try:
            # The stream is closed on any exit (a failed write included), so the images still in the engine are
            # aborted now rather than whenever the generator is collected.
            with tqdm(total=len(todo), desc="images", unit="img", dynamic_ncols=True, disable=not progress) as bar, \
                    contextlib.closing(engine.iter_images([self.specs[i] for i in todo], indices=todo,
                                                          max_in_flight=max_in_flight, stats=stream)) as images:
                for index, result in images:
                    keep(index, result)
                    bar.update(1)
                    if self.stats["failed"]:
                        bar.set_postfix(failed=self.stats["failed"], refresh=False)
        finally:
            seconds = time.perf_counter() - stream.started
            self.stats.update(seconds=round(seconds, 3), images_per_s=round(stream.finished / seconds, 3),
                              decode_seconds=round(stream.decode_seconds, 3),
                              mean_pairs_per_step=round(stream.mean_pairs_per_step, 2))
        return self.stats
