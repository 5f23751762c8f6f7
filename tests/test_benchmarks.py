"""A fast run of each benchmark script on a tiny checkpoint, so the scripts cannot rot. No timing is asserted:
benchmarks report numbers, tests check that they ran and reported them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from helpers.serving import SERVED_MODEL

pytestmark = pytest.mark.engine

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--size", "tiny", "--workdir", str(tmp_path),
                           "--repeats", "1", "--out", str(out), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_bench_generation_smoke(tmp_path):
    result = run_script("bench_generation", tmp_path, "--num-images", "6", "--height", "16", "--width", "16",
                        "--chunk", "4", "--hf-images", "1")
    emu3 = result["emu3_vllm"]
    for entry in (emu3["stream"], emu3["stream_with_decode"], emu3["chunked"], result["cli"], result["plain_vllm"]):
        assert entry["images"] == 6 and entry["images_per_s"] > 0 and entry["mean_pairs_per_step"] > 0, entry
    assert emu3["stream"]["failed"] == 0 and result["cli"]["failed"] == 0
    assert emu3["stream_with_decode"]["decode_share"] > 0 and emu3["chunked"]["decode_share"] > 0
    assert result["transformers"]["tokens_per_s"] > 0
    assert set(result["ratios"]) >= {"stream_over_plain_vllm", "stream_over_chunked", "cli_over_stream",
                                     "stream_over_transformers"}
    assert result["kv_cache"]["pairs_that_fit"] == 2  # 0.3 of 6 images
    assert (tmp_path / "bench_generation.png").stat().st_size > 0


def test_bench_understanding_smoke(tmp_path):
    result = run_script("bench_understanding", tmp_path, "--num-prompts", "3", "--image-size", "48",
                        "--max-new-tokens", "4", "--hf-prompts", "1")
    assert result["emu3_vllm"]["model_class"] == "emu3_vllm.vllm_plugin.model:Emu3ForConditionalGeneration"
    assert "transformers" in result["vllm_transformers_backend"]["model_class"]
    for key in ("emu3_vllm", "vllm_transformers_backend", "transformers"):
        assert result[key]["generated_tokens_per_s"] > 0


def test_bench_serving_smoke(tmp_path, checkpoints, emu3_server):
    # Against the session's server (the script starts its own when not given --url); offline on the same weights.
    result = run_script("bench_serving", tmp_path, "--checkpoint", checkpoints["a"], "--url", emu3_server.url,
                        "--model-name", SERVED_MODEL, "--server-pid", str(emu3_server.proc.pid), "--concurrency",
                        "1,3", "--requests-per-level", "3", "--total-requests", "8", "--height", "16", "--width",
                        "16", "--stream-concurrency", "2", "--partial-images", "2")
    server, offline = result["server"], result["offline"]
    assert [r["concurrency"] for r in server["by_concurrency"]] == [1, 3]
    # 3 + 3 at the two levels, then 3 plain and 3 streamed: past --total-requests, so no soak.
    assert server["errors"] == 0 and server["requests_after_warm_up"] == 12
    assert all(r["images_per_s"] > 0 and r["latency_s"]["p99"] >= r["latency_s"]["p50"] > 0
               for r in server["by_concurrency"])
    streaming = server["streaming"]
    assert (streaming["concurrency"], streaming["partial_images"], streaming["requests"]) == (2, 2, 3)
    assert streaming["streamed"]["first_preview_s"]["p50"] > 0 and streaming["streamed_over_plain"] > 0
    for rss, requests in ((server["rss"], 12), (offline["rss"], 8)):
        assert rss["end_mib"] > 0 and rss["requests"] == requests
        assert set(rss["growth_mib_by_role"]) >= {"front_end", "workers"}
    assert all(r["images_per_s"] > 0 and r["errors"] == 0 for r in offline["by_concurrency"])
    assert set(result["server_over_offline"]) == {"1", "3"}  # JSON keys
    assert (tmp_path / "bench_serving.png").stat().st_size > 0
