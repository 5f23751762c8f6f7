"""This test process's engine settings and the environment of every process the tests start (CLI runs, servers,
torchrun, lmms-eval, benchmark scripts, a nested pytest).

Imported by conftest before any test module, so it records the environment before anything imports vLLM.
"""

from __future__ import annotations

import os

# Small CPU KV cache: the tiny models need a few MB; keep the engines from reserving the default 4 GiB each.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Lets tests run probe functions on the model inside the engine's worker (LLM.apply_model).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# What a user's shell gives the processes the tests start: importing vLLM into this process rewrites its own
# environment (settings meant for an engine in this process), and a server started with those ran at a fraction of
# its speed.
USER_ENV = dict(os.environ)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The user's environment with the tests' small KV cache and unbuffered output (a log or a pipe shows what a
    process said up to the moment it was killed), and `extra` on top."""
    return {**USER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **extra}
