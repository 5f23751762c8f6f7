"""Data-parallel image generation on a Ray cluster: N replicas, each one `Emu3` engine, writing webdataset shards.

Ray Data runs `map_batches` over an actor pool of N `ShardReplica`s (`ActorPoolStrategy(size=N)`; `num_gpus` = the
tensor-parallel size per replica on a cluster with GPUs, a fraction of a CPU per replica on a CPU-only one). A row
is one image, so an image's two CFG halves are always submitted by one replica's engine. The dataset has one block
per shard and batches are whole blocks (`batch_size=None`), so a replica receives a whole shard, streams it
through its engine and writes the shard into `out` itself (tar, parquet, then the stats that mark it done, through
the same `job.run_items` and `webdataset.WebdatasetSink` as one process), returning one summary row. The driver
plans the job first (a `job.GenerationJob`: every item checked, finished shards left out of the dataset), then
only reports progress.
Ray Data LLM's `build_processor` is not used: it submits rows as independent requests and can split a pair.

Images are the same whichever replica draws them: an image depends on its seed only (see `cfg_step`). `out` must be a
folder every node can write (a shared file system) and the model a path every node can read, or a hub id.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emu3_vllm.jobs.job import GenerationJob, run_items
from emu3_vllm.jobs.webdataset import DEFAULT_SHARD_SIZE, ROW_COLUMNS, WebdatasetSink, item_of_row, item_row

# The environment variables the driver passes to its replicas (engine settings a user exports for vLLM).
FORWARDED_ENV_PREFIXES = ("VLLM_",)


class ShardReplica:
    """A Ray Data actor: one Emu3 engine, started once, generating and writing the shards it is handed."""

    def __init__(self, model: str, out: str, model_id: str, shard_size: int, engine_kwargs: dict,
                 engine_seed: int = 0, max_in_flight: int | None = None):
        from emu3_vllm.offline.emu3 import Emu3

        self.engine = Emu3(model, seed=engine_seed, **engine_kwargs)
        self.out = out
        self.model_id = model_id
        self.shard_size = shard_size
        self.max_in_flight = max_in_flight
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch) -> dict[str, list]:
        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else _rows_of(batch)
        sink = WebdatasetSink(self.out, self.model_id, shard_size=self.shard_size)
        shards: dict[int, int] = {}
        for row in rows:
            shards[int(row["shard"])] = shards.get(int(row["shard"]), 0) + 1
        for shard, received in shards.items():
            expected = int(next(r["shard_items"] for r in rows if int(r["shard"]) == shard))
            if received != expected:  # a shard is the unit of work: never write part of one
                raise RuntimeError(f"shard {shard} arrived with {received} of its {expected} items")
            sink.expect(shard, expected)
        started = time.perf_counter()
        items = sorted((item_of_row(row) for row in rows), key=lambda item: item.index)
        run_items(self.engine, items, sink, max_in_flight=self.max_in_flight)
        seconds = time.perf_counter() - started
        # One summary row per shard; the replica's time is split over its shards by their size.
        finished = sink.finished
        return {"shard": [s["shard"] for s in finished],
                "successes": [s["successes"] for s in finished],
                "failed": [s["failed"] for s in finished],
                "seconds": [seconds * s["count"] / len(rows) for s in finished],
                "replica": [self.name] * len(finished)}


def _rows_of(batch: dict) -> list[dict]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def replica_resources(replicas: int, tensor_parallel_size: int, cpus_per_replica: float | None) -> dict[str, float]:
    """Ray resources per replica: its GPUs on a cluster that has any, else a share of a CPU that leaves room for
    Ray Data's own tasks (two whole-CPU replicas plus a read task deadlock on a 2-CPU node)."""
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        return {"num_gpus": tensor_parallel_size, "num_cpus": cpus_per_replica if cpus_per_replica else 1}
    if cpus_per_replica is None:
        cpus_per_replica = min(1.0, resources.get("CPU", 1) / (replicas + 1))
    return {"num_cpus": cpus_per_replica}


def run_on_ray(job: GenerationJob, model: str, *, replicas: int, ray_address: str | None = None,
               tensor_parallel_size: int = 1, cpus_per_replica: float | None = None,
               engine_kwargs: dict | None = None, engine_seed: int = 0, max_in_flight: int | None = None,
               progress: bool = True, on_shard=None) -> dict:
    """Generate the shards `job` has left to do on a Ray cluster with `replicas` engines; returns the job's stats
    plus `replicas`: images, failures and images/s of each replica.

    Connects to `ray_address` (or `RAY_ADDRESS`, or starts a local cluster) unless Ray is already initialised in
    this process; a cluster it started is stopped at the end.
    """
    import pyarrow as pa
    import ray
    from tqdm import tqdm

    if replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas}")
    engine_kwargs = dict(engine_kwargs or {})
    if tensor_parallel_size > 1:
        engine_kwargs.setdefault("tensor_parallel_size", tensor_parallel_size)
        # The replica's ranks are processes of its own on the GPUs Ray gave it, never Ray tasks of their own.
        engine_kwargs.setdefault("distributed_executor_backend", "mp")
    if not job.todo:
        job.stats.update(seconds=0.0, images_per_s=None, replicas=[])
        return job.stats
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=True)
        except ConnectionError as exc:
            raise ConnectionError(f"cannot join the Ray cluster at {ray_address or os.environ.get('RAY_ADDRESS')}: "
                                  f"{exc}") from exc
    try:
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = False  # progress is reported below, per shard
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in ROW_COLUMNS])
        sink = job.sink
        by_shard: dict[int, list[dict]] = {}
        for item in job.todo_items():
            shard = sink.shard_of(item.index)
            by_shard.setdefault(shard, []).append(item_row(item, shard, sink.sizes[shard]))
        tables = [pa.Table.from_pylist(rows, schema=schema) for rows in by_shard.values()]
        dataset = ray.data.from_arrow(tables)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        results = dataset.map_batches(
            ShardReplica, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            compute=ActorPoolStrategy(size=min(replicas, len(tables))),
            fn_constructor_kwargs=dict(model=model, out=str(sink.out), model_id=sink.model,
                                       shard_size=sink.shard_size, engine_kwargs=engine_kwargs,
                                       engine_seed=engine_seed, max_in_flight=max_in_flight),
            runtime_env={"env_vars": env}, **replica_resources(replicas, tensor_parallel_size, cpus_per_replica))
        todo_images = sum(sink.sizes[s] for s in job.todo)
        per_replica: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        try:
            with tqdm(total=todo_images, desc="images", unit="img", dynamic_ncols=True, disable=not progress) as bar:
                for row in results.iter_rows():
                    stats = {"successes": int(row["successes"]), "failed": int(row["failed"])}
                    sink.count(stats)
                    replica = per_replica.setdefault(row["replica"], {"images": 0, "failed": 0, "seconds": 0.0,
                                                                      "shards": 0})
                    replica["images"] += stats["successes"]
                    replica["failed"] += stats["failed"]
                    replica["seconds"] += float(row["seconds"])
                    replica["shards"] += 1
                    bar.update(stats["successes"] + stats["failed"])
                    bar.set_postfix(shards=f"{job.stats['written_shards']}/{len(job.todo)}",
                                    failed=job.stats["failed"], refresh=False)
                    if on_shard is not None:
                        on_shard(int(row["shard"]), row)
        finally:
            seconds = time.perf_counter() - started
            job.stats.update(
                seconds=round(seconds, 3),
                images_per_s=round(job.stats["written"] / seconds, 3) if seconds > 0 else None,
                replicas=[{"replica": name, "shards": r["shards"], "images": r["images"], "failed": r["failed"],
                           "images_per_s": round(r["images"] / r["seconds"], 3) if r["seconds"] > 0 else None}
                          for name, r in sorted(per_replica.items())])
    finally:
        if started_here:
            ray.shutdown()
    return job.stats


def generate_on_ray(model: str | os.PathLike, prompts: Iterable[Any], out: str | os.PathLike, *, replicas: int = 1,
                    shard_size: int = DEFAULT_SHARD_SIZE, ray_address: str | None = None,
                    tensor_parallel_size: int = 1, cpus_per_replica: float | None = None, seed: int = 0,
                    regenerate_changed: bool = False, num_shards: int = 1, shard_index: int = 0,
                    max_in_flight: int | None = None, progress: bool = True, **kwargs: Any) -> dict:
    """Text to image on a Ray cluster into webdataset shards in `out`, resumable shard by shard; returns the
    summary (images, failures, images/s overall and per replica).

    `prompts` are strings or dicts with per-prompt overrides (as `Emu3.generate_images` takes them); image i gets
    seed `seed + i` unless its item sets one. `kwargs` are the images' settings (`height`, `width`, `cfg_scale`,
    `negative_prompt`, `positive_suffix`, `top_k`, `temperature`: `settings.CALL_LEVEL`, with Emu3's defaults) and
    engine arguments for each replica's `Emu3`/`vllm.LLM` (any other name). A re-run
    over the same `out` skips the finished shards and refuses shards made with other settings unless
    `regenerate_changed`. See the module docstring for how replicas are placed.
    """
    from emu3_vllm.engine import check_engine_kwargs, check_kv_cache
    from emu3_vllm.offline.items import GenerationDefaults, check_model
    from emu3_vllm.settings import CALL_LEVEL, Seed, SettingsError, check_value

    try:  # before Ray starts anything: a replica would only die of it
        check_value(Seed, seed, "seed")
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    settings = {name: kwargs.pop(name) for name in CALL_LEVEL if name in kwargs}
    defaults = GenerationDefaults(**settings).checked()
    engine_kwargs = check_engine_kwargs(kwargs)
    model = check_model(model)
    check_kv_cache(model, engine_kwargs.get("kv_cache_dtype"))
    if iter(prompts) is prompts:  # a one-shot iterator: the job reads its prompts twice (plan, then run)
        prompts = list(prompts)
    sink = WebdatasetSink(Path(out), model, shard_size=shard_size, num_shards=num_shards, shard_index=shard_index)
    job = GenerationJob(prompts, sink, defaults, seed, regenerate_changed=regenerate_changed)
    return run_on_ray(job, model, replicas=replicas, ray_address=ray_address,
                      tensor_parallel_size=tensor_parallel_size, cpus_per_replica=cpus_per_replica,
                      engine_kwargs=engine_kwargs, max_in_flight=max_in_flight, progress=progress)
