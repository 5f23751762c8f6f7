"""Running `emu3-vllm` as a user does: a real process, real files, exit codes, stdout and stderr apart."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers.env import subprocess_env

# A CPU engine for the tiny checkpoints, as the tests' shared engines are configured (helpers.engines).
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]


def cli(*args: object, timeout: float = 600, **run_kwargs) -> subprocess.CompletedProcess:
    """The CLI run to its end, its output captured as text; `run_kwargs` go to `subprocess.run`."""
    return subprocess.run([sys.executable, "-m", "emu3_vllm.cli", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, **run_kwargs)


# A terminal's foreground job starts with Ctrl-C at its default action, whatever the test process inherited (a
# SIGINT ignored here would be ignored by the CLI too, and Ctrl-C would then stop only its engine processes).
_AS_A_FOREGROUND_JOB = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv[0] = 'emu3-vllm'; runpy.run_module('emu3_vllm.cli', run_name='__main__')")


def cli_process(*args: object, env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """The CLI in its own process group, as a shell job is (so a test can signal the job as a terminal would);
    `env` adds to the user's environment."""
    return subprocess.Popen([sys.executable, "-c", _AS_A_FOREGROUND_JOB, *map(str, args)],
                            env=subprocess_env(**(env or {})), start_new_session=True, **popen_kwargs)


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def counts(stdout: str) -> dict:
    """The image counts of `generate`'s summary line (its timings vary run to run)."""
    stats = last_json_line(stdout)
    return {k: stats[k] for k in ("out", "images", "skipped", "written", "failed", "regenerated")}
