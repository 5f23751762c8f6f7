"""Files as both output formats write them: crash-safe (a temporary name renamed into place, an append that is whole
or absent) and verified (sizes and sha256), with errors that name the file as the user knows it."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """The output folder cannot be used; the message is one line."""


class ChangedSettingsError(OutputError):
    """The folder holds images of this job's indices made with other settings."""


class WriteError(OSError):
    """Writing an output file failed during a run; `filename` is the file as the user knows it (not its temporary
    name) and the message one line. An OSError, as the failure underneath was, so callers catching that still do."""

    @classmethod
    def of(cls, path: str | Path, exc: OSError) -> WriteError:
        return cls(exc.errno, exc.strerror or str(exc), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


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


def model_identity(model: str) -> str:
    """The model as a manifest records it: a local checkpoint by its absolute path, a hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def intact(path: Path, size: object, sha256: object) -> bool:
    """Whether `path` still has the size and hash a record gives it."""
    try:
        return path.stat().st_size == size and file_sha256(path) == sha256
    except OSError:
        return False


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` whole or not at all: a write that fails part-way (disk full) is cut back, so the next append
    does not land on a partial line. Only a kill can leave one (see `ImageFolderSink` for how a run heals it)."""
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
