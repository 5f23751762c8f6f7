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
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """The prompts file as a whole cannot be used; the message is one line naming the file (and line)."""


def read_prompt_file(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such prompts file")
    if not path.is_file():
        raise PromptFileError(f"{path}: not a file")
    if path.suffix.lower() == ".parquet":
        return read_parquet_prompts(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read ({exc.strerror})") from exc
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    is_jsonl = path.suffix.lower() == ".jsonl"
    items = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise PromptFileError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the "
                                  f"line)") from exc
        if not line.strip():
            continue
        if not is_jsonl:
            items.append(line)
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{number}: not a JSON value ({exc.msg} at column {exc.colno})") from exc
    return items


def read_parquet_prompts(path: Path) -> list[dict]:
    """One item per row of a parquet file: `{"prompt": ..., <override>: ...}`, nulls in override columns left out."""
    from emu3_vllm.offline.items import OVERRIDES

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptFileError(f"{path}: reading parquet prompts needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise PromptFileError(f"{path}: not a readable parquet file ({exc})") from exc
    columns = list(table.column_names)
    if "prompt" not in columns:
        raise PromptFileError(f"{path}: no 'prompt' column (columns: {columns})")
    unknown = [name for name in columns if name not in ("prompt", *OVERRIDES)]
    if unknown:
        raise PromptFileError(f"{path}: unknown columns {unknown}; allowed: {['prompt', *OVERRIDES]}")
    return [{key: value for key, value in row.items() if key == "prompt" or value is not None}
            for row in table.to_pylist()]


def given_prompt(item: Any) -> Any:
    """The prompt an item gives, as given, for the record of an item that failed: a dict's "prompt" (None where it is
    null or missing), any other item itself. Never the whole dict: a reader of the record's "prompt" field finds
    the prompt there (a null prompt stays null, not the text of the item holding it)."""
    return item.get("prompt") if isinstance(item, dict) else item
