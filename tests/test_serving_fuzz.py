"""Schemathesis, the fuzzer vLLM runs against its own OpenAI server, against a real `emu3-vllm serve`.

It draws request bodies from the server's own `/openapi.json`: for `/v1/images/generations` both bodies the schema
allows (many of them real images) and bodies it forbids, for vLLM's `/v1/chat/completions` bodies the schema
allows. No answer may be a 5xx, every answer must match the status codes and schemas the document declares, a body
the schema forbids must be refused, and afterwards the server must be healthy with nothing left running. Hypothesis
is derandomized, so a run sends the same requests every time.
"""

from __future__ import annotations

import json
import time

import pytest
from helpers.serving import SERVED_MODEL, start_server

pytestmark = pytest.mark.engine

# max_model_len 256: every image the schema allows is either refused at once or small enough to draw in well under
# a second, so a few hundred requests fit CI's few minutes (and "auto" is capped below the checkpoint's 64x64).
FUZZ_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "16"]
# (path, generation modes, examples): about a minute on a 2-core machine, after about 40 s of server start.
RUNS = [("/v1/images/generations", ("positive", "negative"), 400),
        ("/v1/chat/completions", ("positive", "negative"), 200)]


@pytest.fixture(scope="module")
def fuzz_server(checkpoints, tmp_path_factory):
    with start_server([checkpoints["a"], "--served-model-name", SERVED_MODEL, *FUZZ_FLAGS],
                      tmp_path_factory.mktemp("fuzz") / "server.log") as server:
        yield server


def fuzz(schema, path: str, modes: tuple[str, ...], examples: int) -> dict:
    """Send `examples` generated requests to one operation; what was sent and every failed check."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis import checks as builtin
    from schemathesis.errors import FailureGroup

    operation = schema[path]["POST"]
    checks = [builtin.not_a_server_error, builtin.status_code_conformance, builtin.content_type_conformance,
              builtin.response_schema_conformance]
    if "negative" in modes:
        checks.append(builtin.negative_data_rejection)
    session = requests.Session()
    seen = {"requests": 0, "bodies": set(), "statuses": {}, "failures": []}

    # Failures are collected rather than raised: shrinking one would cost minutes of requests.
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(*(operation.as_strategy(GenerationMode(mode)) for mode in modes)))
    def run(case):
        seen["requests"] += 1
        seen["bodies"].add(json.dumps(case.body, sort_keys=True, default=repr))
        response = case.call(session=session, timeout=120)
        seen["statuses"][response.status_code] = seen["statuses"].get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as exc:
            seen["failures"].append(str(exc)[:3000])

    run()
    return seen


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(fuzz_server):
    import httpx
    import schemathesis
    from schemathesis.config import ProjectConfig, ProjectsConfig, SchemathesisConfig

    # schemathesis' defaults, whatever config file the working directory holds.
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=SchemathesisConfig(
        projects=ProjectsConfig(default=ProjectConfig())))
    start = time.monotonic()
    totals = {"requests": 0, "bodies": 0, "failures": []}
    for path, modes, examples in RUNS:
        began = time.monotonic()
        seen = fuzz(schema, path, modes, examples)
        print(f"schemathesis {path} ({'+'.join(modes)}): {seen['requests']} requests, {len(seen['bodies'])} "
              f"distinct bodies, {len(seen['failures'])} failures in {time.monotonic() - began:.0f} s; statuses "
              f"{dict(sorted(seen['statuses'].items()))}")
        totals["requests"] += seen["requests"]
        totals["bodies"] += len(seen["bodies"])
        totals["failures"] += seen["failures"]
        assert 200 in seen["statuses"], f"no request to {path} succeeded: the fuzz tested refusals only"
    print(f"schemathesis: {totals['requests']} requests, {totals['bodies']} distinct bodies, "
          f"{len(totals['failures'])} failures in {time.monotonic() - start:.0f} s")
    assert not totals["failures"], "\n\n".join(totals["failures"][:5])

    # The engine survived every request, and nothing is left running once the last answer came back.
    assert httpx.get(fuzz_server.url + "/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 30  # vLLM's gauges follow the engine's stats, a moment behind
    while (gauges := fuzz_server.gauges()) != {"running": 0, "waiting": 0} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gauges == {"running": 0, "waiting": 0}, gauges
    reply = fuzz_server.client(timeout=120).images.generate(model=SERVED_MODEL, prompt="an emu",
                                                             extra_body={"seed": 1})
    # "auto" is the checkpoint's 64x64, capped to the largest square this server's 256 positions hold.
    width, height = map(int, reply.size.split("x"))
    assert reply.data[0].b64_json and width == height < 64 and width % 8 == 0, reply.size
