"""Prompt files as the CLI reads them: one item per non-blank line, checked before any engine starts.

`.jsonl` lines are JSON values (a prompt string, or an object such as `{"prompt": ..., "seed": ...}` or
`{"text": ..., "images": [...]}`); any other file holds one plain-text prompt per line. A file that cannot be read
as such (missing, not UTF-8, a line that is not JSON) raises `PromptFileError` naming the file and line: which
index a broken line would have had is unknowable, so nothing runs. What a well-formed line says is checked per
item later, where a bad value fails that item alone.
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
