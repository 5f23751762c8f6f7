"""Shared fixtures: tiny random Emu3 checkpoints, one vLLM engine per checkpoint for the whole session, and
transformers' Emu3 on the same weights as the reference."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Small CPU KV cache: the tiny models need a few MB; keep the engines from reserving the default 4 GiB each.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Lets tests run probe functions on the model inside the engine's worker (LLM.apply_model).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# The environment a user's shell gives the processes the tests start (CLI runs, servers, lmms-eval): importing vLLM
# into this process rewrites its own (LD_PRELOAD, OpenMP and worker settings meant for an engine in this process),
# and a server started with those ran at a fraction of its speed.
USER_ENV = dict(os.environ)

# Two tiny shapes that differ in every axis the model code depends on.
TINY_SHAPES = {
    "a": dict(),
    "b": dict(hidden_size=192, intermediate_size=320, num_hidden_layers=3, num_attention_heads=3,
              num_key_value_heads=1, codebook_size=300, base_channels=64, seed=1),
}

ENGINE_KWARGS = dict(dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=16)
try:  # on a GPU several tiny engines share the card; vLLM would otherwise reserve 90 % of it for each
    import torch

    if torch.cuda.is_available():
        ENGINE_KWARGS["gpu_memory_utilization"] = 0.08
except ImportError:  # pragma: no cover
    pass


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from emu3_vllm import make_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, overrides in TINY_SHAPES.items():
        overrides = dict(overrides)
        seed = overrides.pop("seed", 0)
        out[name] = str(make_random_checkpoint(root / name, size="tiny", seed=seed, **overrides))
    return out


@pytest.fixture(scope="session")
def engine_factory(checkpoints):
    """One `Emu3` engine per tiny shape for the whole session (engine start on CPU costs ~40 s)."""
    from emu3_vllm import Emu3

    engines = {}

    def get(name: str):
        if name not in engines:
            engines[name] = Emu3(checkpoints[name], **ENGINE_KWARGS)
        return engines[name]

    yield get
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="session")
def hf_factory(checkpoints):
    """transformers' Emu3ForConditionalGeneration + Emu3Processor on the same weights, fp32."""
    import torch
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    cache = {}

    def get(name: str):
        if name not in cache:
            path = checkpoints[name]
            model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
            cache[name] = (model, Emu3Processor.from_pretrained(path))
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------------------------
# One `emu3-vllm serve` process on checkpoint "a" for the whole session (tests/test_serving.py, the benchmark smoke)

# float32 like ENGINE_KWARGS. A KV cache of 96 blocks of 32 tokens (3072 tokens) next to max_model_len 2048: a few
# pairs run at once and the rest wait their turn, and an image can fit the context yet not the cache.
SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "16",
                "--block-size", "32", "--num-gpu-blocks-override", "96"]
SERVED_MODEL = "tiny-emu3"


class Server:
    """A running `emu3-vllm serve` (or any vLLM OpenAI server) process and how to reach it."""

    def __init__(self, args: list[str], log_path, env: dict | None = None, start_timeout: float = 900):
        import socket
        import subprocess
        import sys
        import time

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**USER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        # Its own process group, so stopping it reaches the engine processes too.
        self.proc = subprocess.Popen([sys.executable, "-m", "emu3_vllm.cli", "serve", *map(str, args),
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > start_timeout:
                self.stop()
                raise RuntimeError(f"server not up after {start_timeout} s:\n{self.log_tail()}")
            time.sleep(2)
        self.start_seconds = time.monotonic() - start

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return open(self.log_path).read()[-chars:]

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="EMPTY", **{"max_retries": 0, **kwargs})

    def gauges(self) -> dict[str, float]:
        """vLLM's running and waiting request gauges from /metrics, summed over engines, by name."""
        import httpx

        totals = {"running": 0.0, "waiting": 0.0}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            for name in totals:
                if line.startswith(f"vllm:num_requests_{name}{{"):
                    totals[name] += float(line.rsplit(" ", 1)[1])
        return totals

    def counters(self) -> dict[str, float]:
        """vLLM's cumulative counters from /metrics, summed over engines: generated tokens and engine steps."""
        import httpx

        names = {"vllm:generation_tokens_total{": "generated", "vllm:iteration_tokens_total_count{": "steps"}
        totals = dict.fromkeys(names.values(), 0.0)
        for line in httpx.get(self.url + "/metrics", timeout=60).text.splitlines():
            for prefix, name in names.items():
                if line.startswith(prefix):
                    totals[name] += float(line.rsplit(" ", 1)[1])
        return totals

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # engine processes outliving the API server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


@pytest.fixture(scope="session")
def emu3_server(checkpoints, tmp_path_factory):
    server = Server([checkpoints["a"], "--served-model-name", SERVED_MODEL, *SERVER_FLAGS],
                    tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shapes_engine():
    """One engine on the trained shapes checkpoint that ships with the package, for the whole session."""
    from emu3_vllm import Emu3, shapes_checkpoint

    engine = Emu3(shapes_checkpoint(), **{**ENGINE_KWARGS, "max_num_seqs": 64})
    yield engine
    engine.close()
