"""Shared plumbing for the benchmark scripts: setup, thread settings, memory sampling, timing, JSON, plots."""

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


def plot_lines(path: str, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
               hlines: dict[str, float] | None = None) -> None:
    """A small line chart as PNG, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 440, 64
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    ys = [y for _, y in points] + list((hlines or {}).values())
    xs = [x for x, _ in points]
    if not points:
        return
    x_min, x_max = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_max = max(ys) * 1.1 or 1.0

    def to_px(x, y):
        return (margin + (x - x_min) / (x_max - x_min) * (width - 2 * margin),
                height - margin - y / y_max * (height - 2 * margin))

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, 20), title, fill="black")
    draw.text((width // 2 - 40, height - 30), xlabel, fill="black")
    draw.text((8, margin - 20), ylabel, fill="black")
    for i in range(5):
        y = y_max * i / 4
        _, py = to_px(x_min, y)
        draw.text((8, py - 6), f"{y:.3g}", fill="gray")
    for x in sorted(set(xs)):
        px, _ = to_px(x, 0)
        draw.text((px - 6, height - margin + 6), f"{x:g}", fill="gray")
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    legend_y = margin + 8
    for (name, pts), color in zip(series.items(), colors):
        pts = sorted(pts)
        draw.line([to_px(x, y) for x, y in pts], fill=color, width=3)
        for x, y in pts:
            px, py = to_px(x, y)
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.text((margin + 10, legend_y), name, fill=color)
        legend_y += 16
    for (name, y), color in zip((hlines or {}).items(), colors[len(series):] or ["gray"]):
        _, py = to_px(x_min, y)
        draw.line([(margin, py), (width - margin, py)], fill=color, width=2)
        draw.text((margin + 10, legend_y), name, fill=color)
        legend_y += 16
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"wrote {path}")
