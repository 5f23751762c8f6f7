"""Shared plumbing for the benchmark scripts: setup, thread settings, memory sampling, timing, JSON, plots
(matplotlib)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def add_common_args(parser, default_size: str = "small") -> None:
    parser.add_argument("--size", default=default_size, choices=["tiny", "small", "8b"],
                        help="shape of the random checkpoint to build (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", help="an existing Emu3 checkpoint directory instead of a random one")
    parser.add_argument("--workdir", help="where to build the random checkpoint (default: a temporary folder)")
    parser.add_argument("--dtype", default=None, help="engine/model dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every contender (vLLM's OMP binding and torch); default: all cores")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    parser.add_argument("--skip-peer", action="store_true", help="leave out the plain-vLLM / vLLM-backend peer")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra vllm.LLM argument for both vLLM contenders (repeatable; VALUE parsed as JSON)")
    parser.add_argument("--out", help="write the results JSON here")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_threads(threads: int | None) -> int:
    """One thread setting for all contenders: vLLM's CPU worker binds OMP threads to these cores, torch uses as many."""
    import torch

    n = threads or os.cpu_count() or 1
    # A benchmark owns its process: its engines die with it, even when it is killed.
    os.environ.setdefault("EMU3_VLLM_ENGINE_DIES_WITH_PARENT", "1")
    if not has_cuda():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    torch.set_num_threads(n)
    return n


def engine_args(args, **defaults) -> dict:
    out = dict(defaults)
    out["dtype"] = args.dtype or ("bfloat16" if has_cuda() else "float32")
    if not has_cuda():
        out.setdefault("enforce_eager", True)  # vLLM's CPU graph compile would dominate a short CPU run
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def checkpoint(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    from emu3_vllm import make_random_checkpoint

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="emu3_bench_"))
    path = root / f"emu3-random-{args.size}"
    if not (path / "config.json").exists():
        print(f"building a random {args.size} checkpoint in {path} ...", flush=True)
        make_random_checkpoint(path, size=args.size)
    return str(path)


def max_positions(path: str) -> int:
    config = json.loads((Path(path) / "config.json").read_text())
    return int(config["text_config"]["max_position_embeddings"])


def count_parameters(path: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if "vqmodel" not in name:  # the decoder's parameters, the ones every token runs through
                    total += _prod(st.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class PeakMemory:
    """Peak memory while running: the GPU's used memory (device-wide) on CUDA, else the RSS of this process tree."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> int:
        if has_cuda():
            import torch

            free, total = torch.cuda.mem_get_info()
            return total - free
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 3)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def best_and_median(values: list[float]) -> tuple[float, dict]:
    """The fastest run (what the code can do when nothing else interferes; the figure reported) and the spread."""
    return min(values), {"seconds_best": round(min(values), 4), "seconds_median": round(median(values), 4),
                         "seconds_all": [round(v, 4) for v in values]}


@contextmanager
def timed():
    box = {}
    start = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - start


def environment(threads: int) -> dict:
    import torch
    import transformers
    import vllm

    info = {"python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "transformers": transformers.__version__, "threads": threads, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER")}
    if has_cuda():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: str, title: str, ylabel: str, values: dict[str, float],
              notes: dict[str, str] | None = None) -> None:
    """A bar chart as PNG: one bar per contender, its value on top and an optional note inside."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    labels = list(values)
    bars = ax.bar(range(len(labels)), [values[k] for k in labels], color=plt.cm.tab10.colors[:len(labels)])
    ax.bar_label(bars, labels=[f"{values[k]:.3g}" for k in labels], padding=2)
    for bar, label in zip(bars, labels):
        if notes and label in notes:
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() / 2, notes[label], ha="center",
                    va="center", rotation=90, color="white", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def plot_lines(path: str, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
               hlines: dict[str, float] | None = None, logx: bool = False) -> None:
    """A line chart as PNG: one line per series of (x, y) points, plus optional horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="gray", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
