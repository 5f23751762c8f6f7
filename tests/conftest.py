"""Shared fixtures: tiny random Emu3 checkpoints, one vLLM engine per checkpoint for the whole session,
transformers' Emu3 on the same weights as the reference, and one `emu3-vllm serve` process. Helpers are in
tests/helpers."""

from __future__ import annotations

# First: it records the environment a user's shell gives the processes the tests start, before anything imports vLLM.
import helpers.env  # noqa: F401
import pytest
from helpers.engines import ENGINE_KWARGS, TINY_SHAPES
from helpers.serving import SERVED_MODEL, SERVER_FLAGS, start_server


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


@pytest.fixture(scope="session")
def emu3_server(checkpoints, tmp_path_factory):
    with start_server([checkpoints["a"], "--served-model-name", SERVED_MODEL, *SERVER_FLAGS],
                      tmp_path_factory.mktemp("server") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def shapes_engine():
    """One engine on the trained shapes checkpoint that ships with the package, for the whole session."""
    from emu3_vllm import Emu3, shapes_checkpoint

    engine = Emu3(shapes_checkpoint(), **{**ENGINE_KWARGS, "max_num_seqs": 64})
    yield engine
    engine.close()
