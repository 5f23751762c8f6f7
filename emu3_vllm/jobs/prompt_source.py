"""Prompt files as the CLI reads them: one item per non-blank line (or parquet row), checked before any engine starts.

`.jsonl` lines are JSON values (a prompt string, or an object such as `{"prompt": ..., "seed": ...}` or
`{"text": ..., "images": [...]}`); `.parquet` files have a `prompt` column and optionally the per-prompt override
columns (`seed`, `height`, `width`, `cfg_scale`, `negative_prompt`), one item per row; any other file holds one
plain-text prompt per line. A file that cannot be read as such (missing, not UTF-8, a line that is not JSON, a
parquet file without a `prompt` column or with columns nothing reads) raises `PromptFileError` naming the file
(and line): which index a broken line would have had is unknowable, so nothing runs. What a well-formed line or
row says is checked per item later, where a bad value fails that item alone.

A parquet column cannot be absent for one row, so a null in an optional column means "not given": that row gets
the run's setting (`--height`, `--cfg-scale`, ..., and for `seed` the run's `--seed` + index), exactly as a JSON
line without the key does. A null prompt is that item's error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """The prompts file as a whole cannot be used; the message is one line naming the file (and line)."""


class PromptFile:
    """A prompts file, read lazily: each pass over it reads the file again, one line (or parquet batch) at a time,
    so a job of a million prompts never holds them all. The file is checked when the object is made (it exists, a
    parquet file has usable columns); a broken line raises `PromptFileError` when a pass reaches it, which a job's
    planning pass does before any engine starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise PromptFileError(f"{self.path}: no such prompts file")
        if not self.path.is_file():
            raise PromptFileError(f"{self.path}: not a file")
        self.parquet = self.path.suffix.lower() == ".parquet"
        if self.parquet:
            self._parquet_file()

    def __iter__(self) -> Iterator[Any]:
        return self._parquet_rows() if self.parquet else self._lines()

    def _lines(self) -> Iterator[Any]:
        path = self.path
        is_jsonl = path.suffix.lower() == ".jsonl"
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except OSError as exc:
            raise PromptFileError(f"{path}: cannot read ({exc.strerror})") from exc
        with fh:
            for number, raw in enumerate(fh, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8").removesuffix("\n").rstrip("\r")
                except UnicodeDecodeError as exc:
                    raise PromptFileError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of "
                                          "the line)") from exc
                if not line.strip():
                    continue
                if not is_jsonl:
                    yield line
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PromptFileError(f"{path}:{number}: not a JSON value ({exc.msg} at column {exc.colno})") \
                        from exc

    def _parquet_file(self):
        from emu3_vllm.settings import PER_PROMPT

        path = self.path
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PromptFileError(f"{path}: reading parquet prompts needs pyarrow (pip install pyarrow)") from None
        try:
            file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a file that is not parquet
            raise PromptFileError(f"{path}: not a readable parquet file ({exc})") from exc
        columns = list(file.schema_arrow.names)
        if "prompt" not in columns:
            raise PromptFileError(f"{path}: no 'prompt' column (columns: {columns})")
        unknown = [name for name in columns if name not in ("prompt", *PER_PROMPT)]
        if unknown:
            raise PromptFileError(f"{path}: unknown columns {unknown}; allowed: {['prompt', *PER_PROMPT]}")
        return file

    def _parquet_rows(self) -> Iterator[dict]:
        """One item per row: `{"prompt": ..., <override>: ...}`, nulls in override columns left out."""
        file = self._parquet_file()
        try:
            for batch in file.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield {key: value for key, value in row.items() if key == "prompt" or value is not None}
        except PromptFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt row group
            raise PromptFileError(f"{self.path}: not a readable parquet file ({exc})") from exc


def read_prompt_file(path: str | Path) -> list[Any]:
    """Every item of a prompts file, for commands that need them all at once (`understand`)."""
    return list(PromptFile(path))


def given_prompt(item: Any) -> Any:
    """The prompt an item gives, as given, for the record of an item that failed: a dict's "prompt" (None where it is
    null or missing), any other item itself. Never the whole dict: a reader of the record's "prompt" field finds
    the prompt there (a null prompt stays null, not the text of the item holding it)."""
    return item.get("prompt") if isinstance(item, dict) else item
