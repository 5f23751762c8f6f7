"""Serving load: the OpenAI client against `emu3-vllm serve`'s /v1/images/generations, with offline
`Emu3.generate_images` on the same workload as the ceiling, in one run.

    python benchmarks/bench_serving.py --size small --out benchmarks/results/serving_cpu_small.json

(a) server   `emu3-vllm serve` started here (or `--url` of one already running), and at each concurrency c, c
             closed-loop clients (each its own `openai.AsyncOpenAI`, one image per request, a fresh prompt and seed
             each time) send `--requests-per-level` requests (default max(8, 3c)): images/s, latency p50/p95/p99,
             errors. Then clients at the top concurrency go on until `--total-requests` have been served, while the
             resident memory (RSS) of the server's processes (API server, engine core, worker) is sampled: its
             growth from after the warm-up (one burst at the top concurrency) to the end is the leak check.
             Streaming: at `--stream-concurrency` (default 16) the same number of requests once without and once
             with `stream: true, partial_images: --partial-images` (default 3), back to back: images/s of both
             and the time to each request's first preview.
(b) offline  `Emu3.generate_images` on the same prompts, size, scale and seeds, with `max_in_flight=c`, and the
             same soak: the same engine settings without HTTP, the ceiling for (a). Images are VQ-decoded in both.
             RSS is accounted the same way (this process, the engine core, the worker), by process, so growth that
             is the engine's own shows up in both.

Both use the same checkpoint, dtype, engine arguments and thread settings, one after the other (never at once). On
CPU the engine is bound to every core but one, which is left to the API server, the VQ decode and the clients.
Prints a table, writes JSON (--out) and a PNG (throughput, latency, RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from emu3_vllm.testing.server import ServerProcess  # noqa: E402

PROMPT_SUBJECTS = ["a red emu", "a lighthouse at dawn", "a bowl of ramen", "a snowy forest", "a city at night",
                   "a watercolor fox", "an old sailing ship", "a mountain lake"]
MODEL_NAME = "emu3-bench"


def workload(n: int, take: str) -> list[tuple[str, int]]:
    """n (prompt, seed) pairs; each `take` has its own texts, so no run reuses another's prefix cache (only the
    shared negative prompt is meant to be cached)."""
    return [(f"{PROMPT_SUBJECTS[i % len(PROMPT_SUBJECTS)]}, picture {i}, {take}", 10_000 + i) for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def server_flags(kwargs: dict) -> list[str]:
    """`vllm serve` flags for engine kwargs."""
    import json

    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return flags


def tree_rss(pid: int | None) -> dict[str, float] | None:
    """Resident MiB of a process tree by role: the front end (API server, or this process offline), the engine core,
    the model-runner workers, and anything else (vLLM's resource tracker, a data-parallel coordinator)."""
    if pid is None:
        return None
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    roles = dict.fromkeys(("front_end", "engine_core", "workers", "other"), 0.0)
    for proc in procs:
        try:
            name, rss = proc.name(), proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        role = ("front_end" if proc.pid == pid else "workers" if "Worker" in name
                else "engine_core" if "EngineCore" in name else "other")
        roles[role] += rss
    return {k: round(v, 1) for k, v in roles.items()}


def rss_summary(samples: list[tuple[int, float, dict]]) -> dict:
    """Growth from the first sample to the last, in total and by role."""
    (_, first, first_roles), (served, last, last_roles) = samples[0], samples[-1]
    return {"requests": served, "start_mib": first, "end_mib": last, "peak_mib": max(s[1] for s in samples),
            "growth_pct": round(100 * (last - first) / first, 2),
            "growth_mib_by_role": {k: round(last_roles[k] - first_roles[k], 1) for k in first_roles},
            "start_mib_by_role": first_roles, "samples": [s[:2] for s in samples]}


class Clients:
    """Closed-loop clients on one asyncio loop (`openai.AsyncOpenAI`, one client object per simulated user): each
    sends its next request when its last one is answered."""

    def __init__(self, url: str, model: str, size: str, extra: dict):
        self.url, self.model, self.size, self.extra = url, model, size, extra
        self.served = 0  # read by the RSS sampler's thread
        self.previews = 0  # previews received by streamed requests

    def run(self, jobs: list[tuple[str, int]], concurrency: int, partial_images: int | None = None) -> dict:
        """One level of load; with `partial_images`, every request streams (`stream: true`) that many previews."""
        return asyncio.run(self._run(jobs, concurrency, partial_images))

    async def _image(self, client, prompt: str, seed: int, partial_images: int | None, first_preview: list) -> None:
        if partial_images is None:
            reply = await client.images.generate(model=self.model, prompt=prompt, size=self.size, n=1,
                                                 response_format="b64_json", extra_body={"seed": seed, **self.extra})
            item = reply.data[0]
            if not item.b64_json:
                raise RuntimeError(getattr(item, "error", None) or "no image in the reply")
            return
        start, completed = time.perf_counter(), False
        stream = await client.images.generate(model=self.model, prompt=prompt, size=self.size, n=1, stream=True,
                                              partial_images=partial_images, extra_body={"seed": seed, **self.extra})
        previews = 0
        async for event in stream:
            if event.type == "image_generation.partial_image":
                previews += 1
                if previews == 1:
                    first_preview.append(time.perf_counter() - start)
            completed = completed or event.type == "image_generation.completed"
        if not completed:
            raise RuntimeError("the stream ended without its image")
        self.previews += previews

    async def _run(self, jobs: list[tuple[str, int]], concurrency: int, partial_images: int | None) -> dict:
        from openai import AsyncOpenAI

        queue = list(reversed(jobs))
        latencies, errors, first_preview = [], [], []

        async def user():
            async with AsyncOpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0, timeout=3600) as client:
                while queue:
                    prompt, seed = queue.pop()
                    start = time.perf_counter()
                    try:
                        await self._image(client, prompt, seed, partial_images, first_preview)
                    except Exception as exc:  # noqa: BLE001 - counted and reported
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    else:
                        latencies.append(time.perf_counter() - start)
                    self.served += 1

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        level = {"concurrency": concurrency, "requests": len(jobs), "seconds": round(seconds, 3),
                 "images_per_s": len(latencies) / seconds, "errors": len(errors), "error_examples": errors[:5],
                 "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                               "p99": percentile(latencies, 99), "mean": sum(latencies) / max(len(latencies), 1)}}
        if partial_images is not None:
            level["partial_images"] = partial_images
            level["previews_per_image"] = self.previews / max(len(latencies), 1)
            self.previews = 0
            level["first_preview_s"] = {"p50": percentile(first_preview, 50), "p95": percentile(first_preview, 95)}
        return level


class RssSampler(threading.Thread):
    """(requests served, RSS MiB, RSS MiB by role) every `interval` seconds while the load runs."""

    def __init__(self, pid: int | None, served, interval: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.served, self.interval = pid, served, interval
        self.samples: list[tuple[int, float, dict]] = []
        self._halt = threading.Event()

    def sample(self) -> None:
        roles = tree_rss(self.pid)
        if roles is not None:
            self.samples.append((self.served(), round(sum(roles.values()), 1), roles))

    def run(self):
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


def run_server(args, ckpt, kwargs, concurrencies, per_level) -> dict:
    out = {"by_concurrency": []}
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        server = ServerProcess([ckpt, "--served-model-name", MODEL_NAME, *server_flags(kwargs)],
                               Path(args.workdir or ".") / "bench_serving_server.log", start_timeout=1200)
        print("starting:", " ".join(server.command), flush=True)
        server.start()
        url, pid = server.url, server.proc.pid
        out["server_start_s"] = round(server.start_seconds, 1)
        print(f"server up in {server.start_seconds:.0f} s", flush=True)
    try:
        extra = {"guidance_scale": args.cfg_scale, "top_k": args.top_k}
        clients = Clients(url, args.model_name or MODEL_NAME, f"{args.width}x{args.height}", extra)
        top = max(concurrencies)
        warm = clients.run(workload(top, "warm-up"), top)  # a burst at the top concurrency primes every pool
        out["warm_up"] = {"requests": warm["requests"], "errors": warm["errors"], "seconds": warm["seconds"]}
        clients.served = 0
        sampler = RssSampler(pid, lambda: clients.served)
        sampler.sample()
        sampler.start()
        for c in concurrencies:
            level = clients.run(workload(per_level[c], f"server c{c}"), c)
            out["by_concurrency"].append(level)
            lat = level["latency_s"]
            print(f"server  c={c:3d}: {level['requests']:4d} requests {level['seconds']:8.2f} s "
                  f"{level['images_per_s']:7.3f} images/s  p50 {lat['p50']:.2f} p95 {lat['p95']:.2f} "
                  f"p99 {lat['p99']:.2f} s  errors {level['errors']}", flush=True)
        if args.stream_concurrency:
            c = args.stream_concurrency
            n = args.requests_per_level or max(8, 3 * c)
            plain = clients.run(workload(n, f"plain c{c}"), c)
            streamed = clients.run(workload(n, f"streamed c{c}"), c, partial_images=args.partial_images)
            out["streaming"] = {"concurrency": c, "requests": n, "partial_images": args.partial_images,
                                "plain": plain, "streamed": streamed,
                                "streamed_over_plain": streamed["images_per_s"] / plain["images_per_s"]}
            print(f"server  c={c:3d} streamed with partial_images={args.partial_images}: "
                  f"{streamed['images_per_s']:.3f} images/s against {plain['images_per_s']:.3f} without "
                  f"({out['streaming']['streamed_over_plain']:.2f}x), {streamed['previews_per_image']:.2f} previews "
                  f"per image; first preview p50 "
                  f"{streamed['first_preview_s']['p50']:.2f} s, p95 {streamed['first_preview_s']['p95']:.2f} s; "
                  f"errors {plain['errors'] + streamed['errors']}", flush=True)
        soak = args.total_requests - clients.served
        if soak > 0:
            level = clients.run(workload(soak, "soak"), top)
            out["soak"] = {k: level[k] for k in ("concurrency", "requests", "seconds", "images_per_s", "errors",
                                                  "error_examples")}
            print(f"server  soak at c={top}: {soak} more requests, {level['images_per_s']:.3f} images/s, "
                  f"errors {level['errors']}", flush=True)
        sampler.stop()
        out["requests_after_warm_up"] = clients.served
        out["errors"] = (sum(level["errors"] for level in out["by_concurrency"]) + out.get("soak", {}).get("errors", 0)
                         + sum(out["streaming"][k]["errors"] for k in ("plain", "streamed") if "streaming" in out))
        if sampler.samples:
            out["rss"] = rss_summary(sampler.samples)
    finally:
        if server is not None:
            server.stop()
    return out


def run_offline(args, ckpt, kwargs, concurrencies, per_level) -> dict:
    """The same workload through `Emu3.generate_images`, and the same soak, with the same RSS accounting (the
    front end is this process)."""
    from emu3_vllm import Emu3

    out = {"by_concurrency": []}
    with _common.timed() as start:
        engine = Emu3(ckpt, **kwargs)
    out["engine_start_s"] = round(start["seconds"], 1)
    gen = dict(height=args.height, width=args.width, cfg_scale=args.cfg_scale, top_k=args.top_k, use_tqdm=False)
    served = 0

    def run(jobs, c):
        nonlocal served
        with _common.timed() as t:
            results = engine.generate_images([p for p, _ in jobs], seed=[s for _, s in jobs], max_in_flight=c, **gen)
        served += len(jobs)
        failed = [r.error for r in results if r.error]
        return {"concurrency": c, "requests": len(jobs), "seconds": round(t["seconds"], 3),
                "images_per_s": (len(jobs) - len(failed)) / t["seconds"], "errors": len(failed),
                "error_examples": failed[:5]}

    try:
        top = max(concurrencies)
        run(workload(top, "warm-up"), top)
        served = 0
        sampler = RssSampler(os.getpid(), lambda: served)
        sampler.sample()
        sampler.start()
        for c in concurrencies:
            level = run(workload(per_level[c], f"offline c{c}"), c)
            out["by_concurrency"].append(level)
            print(f"offline c={c:3d}: {level['requests']:4d} images   {level['seconds']:8.2f} s "
                  f"{level['images_per_s']:7.3f} images/s  errors {level['errors']}", flush=True)
        soak = args.total_requests - served
        if soak > 0:
            level = run(workload(soak, "soak"), top)
            out["soak"] = {k: level[k] for k in ("concurrency", "requests", "seconds", "images_per_s", "errors")}
            print(f"offline soak at c={top}: {soak} more images, {level['images_per_s']:.3f} images/s", flush=True)
        sampler.stop()
        out["rss"] = rss_summary(sampler.samples)
    finally:
        engine.close()
    return out


def plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), dpi=110)
    server = result["server"]["by_concurrency"]
    xs = [r["concurrency"] for r in server]
    ax = axes[0]
    ax.plot(xs, [r["images_per_s"] for r in server], marker="o", label="emu3-vllm serve (openai client)")
    if "offline" in result:
        offline = result["offline"]["by_concurrency"]
        ax.plot([r["concurrency"] for r in offline], [r["images_per_s"] for r in offline], marker="s",
                linestyle="--", label="offline generate_images (ceiling)")
    ax.set(xscale="log", xlabel="concurrent clients (offline: images in flight)", ylabel="images/s",
           title="throughput")
    ax.legend(fontsize=8)
    ax = axes[1]
    for q in ("p50", "p95", "p99"):
        ax.plot(xs, [r["latency_s"][q] for r in server], marker="o", label=q)
    ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds per request", title="latency")
    ax.legend(fontsize=8)
    ax = axes[2]
    rss = result["server"].get("rss")
    if rss:
        ax.plot([s for s, _ in rss["samples"]], [m for _, m in rss["samples"]], marker=".",
                label=f"server + engine: {rss['growth_pct']:+.2f} %")
        offline_rss = result.get("offline", {}).get("rss")
        if offline_rss:
            ax.plot([s for s, _ in offline_rss["samples"]], [m for _, m in offline_rss["samples"]], marker=".",
                    linestyle="--", label=f"offline (this process + engine): {offline_rss['growth_pct']:+.2f} %")
        ax.legend(fontsize=8)
    ax.set(xlabel="requests served after warm-up", ylabel="resident MiB", title="memory")
    for ax in axes[:2]:
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
    env = result["environment"]
    load = result["load_average"]
    fig.suptitle(f"Emu3 /v1/images/generations, {result['image']['width']}x{result['image']['height']}, "
                 f"{result['size'] or 'checkpoint'}, {env.get('gpu', 'CPU')}, load avg {load['start'][0]:.1f}"
                 f" -> {load['end'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--url", help="a running emu3-vllm serve (default: start one here)")
    parser.add_argument("--model-name", help=f"its served model name (default {MODEL_NAME})")
    parser.add_argument("--server-pid", type=int, help="its process id, for RSS (with --url)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests-per-level", type=int, default=None, help="requests at each concurrency "
                        "(default max(8, 3 x concurrency))")
    parser.add_argument("--total-requests", type=int, default=500,
                        help="requests served after the warm-up, the levels included (RSS is measured over them)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=2048)
    parser.add_argument("--skip-offline", action="store_true", help="leave out the offline ceiling")
    parser.add_argument("--stream-concurrency", type=int, default=16,
                        help="concurrency of the streaming comparison (0: leave it out)")
    parser.add_argument("--partial-images", type=int, default=3, choices=range(4),
                        help="previews per streamed image (OpenAI's partial_images)")
    parser.add_argument("--repeats", type=int, default=1, help="accepted for the common smoke-run interface")
    parser.add_argument("--plot", help="PNG (default: beside --out)")
    args = parser.parse_args(argv)

    cores = args.threads or os.cpu_count() or 1
    if cores > 1 and not _common.has_cuda():
        # The engine gets every core but one; that one serves HTTP, VQ decode and the clients (vLLM's own CPU
        # default also leaves a core free). The offline run gets the same engine.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if cores == 2 else f"0-{cores - 2}")
    threads = _common.configure_threads(args.threads)
    ckpt = _common.checkpoint(args)
    concurrencies = sorted({int(c) for c in args.concurrency.split(",") if int(c) > 0})
    per_level = {c: args.requests_per_level or max(8, 3 * c) for c in concurrencies}
    from emu3_vllm.layout import num_image_tokens, pixels_to_grid

    h, w = pixels_to_grid(args.height, args.width)
    top = max(concurrencies)
    max_len = min(256 + num_image_tokens(h, w), _common.max_positions(ckpt))
    kwargs = _common.engine_args(args, max_num_seqs=2 * top, max_model_len=max_len)

    result = {"benchmark": "serving", "size": None if args.checkpoint else args.size, "checkpoint": ckpt,
              "image": {"height": h * 8, "width": w * 8, "grid": [h, w], "tokens_per_image": num_image_tokens(h, w)},
              "cfg_scale": args.cfg_scale, "top_k": args.top_k, "concurrency": concurrencies,
              "requests_per_level": per_level, "engine_args": kwargs, "environment": _common.environment(threads),
              "load_average": {"start": os.getloadavg()}}
    result["server"] = run_server(args, ckpt, kwargs, concurrencies, per_level)
    if not args.skip_offline:
        result["offline"] = run_offline(args, ckpt, kwargs, concurrencies, per_level)
    result["load_average"]["end"] = os.getloadavg()

    server_top = result["server"]["by_concurrency"][-1]
    targets = {f"0 errors over {result['server']['requests_after_warm_up']} requests": result["server"]["errors"] == 0}
    if "rss" in result["server"]:
        targets["server + engine RSS growth < 5 %"] = result["server"]["rss"]["growth_pct"] < 5
    if "streaming" in result["server"]:
        streaming = result["server"]["streaming"]
        targets[f"streamed images/s at concurrency {streaming['concurrency']} with partial_images="
                f"{streaming['partial_images']} >= 0.9 x without"] = streaming["streamed_over_plain"] >= 0.9
    if "offline" in result:
        offline_top = result["offline"]["by_concurrency"][-1]
        result["server_over_offline"] = {r["concurrency"]: r["images_per_s"] / o["images_per_s"]
                                         for r, o in zip(result["server"]["by_concurrency"],
                                                         result["offline"]["by_concurrency"])}
        targets[f"images/s at concurrency {top} >= 0.85 x offline"] = (
            server_top["images_per_s"] >= 0.85 * offline_top["images_per_s"])
    result["targets_met"] = targets

    print()
    rows = []
    for i, level in enumerate(result["server"]["by_concurrency"]):
        lat = level["latency_s"]
        offline = result["offline"]["by_concurrency"][i]["images_per_s"] if "offline" in result else float("nan")
        rows.append([level["concurrency"], level["requests"], level["images_per_s"], offline, lat["p50"], lat["p95"],
                     lat["p99"], level["errors"]])
    _common.print_table(["clients", "requests", "server images/s", "offline images/s", "p50 s", "p95 s", "p99 s",
                         "errors"], rows)
    for name in ("server", "offline"):
        rss = result.get(name, {}).get("rss")
        if rss:
            print(f"RSS {name}: {rss['start_mib']} MiB -> {rss['end_mib']} MiB ({rss['growth_pct']:+.2f} %) over "
                  f"{rss['requests']} requests; growth by process: {rss['growth_mib_by_role']} MiB")
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")

    _common.write_json(args.out, result)
    path = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if path:
        plot(path, result)
    return result


if __name__ == "__main__":
    main()
