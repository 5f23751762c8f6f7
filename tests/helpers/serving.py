"""`emu3-vllm serve` as the tests start it: the user's environment, and the settings of the session's server."""

from __future__ import annotations

import time

from emu3_vllm.testing.server import ServerProcess
from helpers.env import subprocess_env

# float32 like the in-process engines. A KV cache of 96 blocks of 32 tokens (3072 tokens) next to max_model_len
# 2048: a few pairs run at once and the rest wait their turn, and an image can fit the context yet not the cache.
SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "16",
                "--block-size", "32", "--num-gpu-blocks-override", "96"]
SERVED_MODEL = "tiny-emu3"


def start_server(args: list, log_path, **env: str) -> ServerProcess:
    """A running `emu3-vllm serve` with `args`, up within 15 minutes (a busy CI machine starts an engine slowly);
    `env` adds to the user's environment. Stop it with `.stop()` or a `with` block."""
    return ServerProcess(args, log_path, env=subprocess_env(**env), start_timeout=900).start()


def wait_idle(server: ServerProcess, timeout: float) -> float:
    """Seconds until no request is running or waiting; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if sum(server.gauges().values()) == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"still busy after {timeout} s: {server.gauges()}")
