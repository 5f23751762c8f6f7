"""Running `emu3-vllm` as a user does: a real process, real files, exit codes, stdout and stderr apart."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

# A CPU engine for the tiny checkpoints, as the tests' shared engines are configured (tests/conftest.py).
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]


def cli_env() -> dict:
    from conftest import USER_ENV

    return {**USER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu3_vllm.cli", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


# A terminal's foreground job starts with Ctrl-C at its default action, whatever the test process inherited (a
# SIGINT ignored here would be ignored by the CLI too, and Ctrl-C would then stop only its engine processes).
_AS_A_FOREGROUND_JOB = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv[0] = 'emu3-vllm'; runpy.run_module('emu3_vllm.cli', run_name='__main__')")


def cli_process(*args: str, env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """The CLI in its own process group, as a shell job is (so a test can signal the job as a terminal would);
    `env` adds to the user's environment."""
    return subprocess.Popen([sys.executable, "-c", _AS_A_FOREGROUND_JOB, *map(str, args)],
                            env={**cli_env(), **(env or {})}, start_new_session=True, **popen_kwargs)


def manifest(out: Path) -> list[dict]:
    """Every complete manifest line (a line cut short by a kill is skipped, as a resume does)."""
    path = out / "manifest.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def assert_manifest_names_complete_files(out: Path) -> list[dict]:
    """Each index's latest line (a later line for an index replaces an earlier one) that names a PNG points to a
    file of the recorded size and hash that decodes whole. Returns those latest lines."""
    from PIL import Image

    records = list({r["index"]: r for r in manifest(out)}.values())
    for record in records:
        if "file" not in record:
            continue
        data = (out / record["file"]).read_bytes()
        assert len(data) == record["bytes"], record
        assert hashlib.sha256(data).hexdigest() == record["sha256"], record
        with Image.open(out / record["file"]) as image:
            image.load()
    return records


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def counts(stdout: str) -> dict:
    """The image counts of `generate`'s summary line (its timings vary run to run)."""
    stats = last_json_line(stdout)
    return {k: stats[k] for k in ("out", "images", "skipped", "written", "failed", "regenerated")}
