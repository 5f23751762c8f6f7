"""A vLLM OpenAI-compatible server process (`emu3-vllm serve` unless told otherwise) for tests and benchmarks.

    with ServerProcess([checkpoint, "--served-model-name", "tiny"], "server.log") as server:
        server.client().images.generate(model="tiny", prompt="an emu")

It listens on a free local port, writes its stdout and stderr to a log file, and runs in its own process group:
vLLM's engine core and workers are processes of their own, and stopping the group reaches them too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

EMU3_SERVE = (sys.executable, "-m", "emu3_vllm.cli", "serve")

# /metrics samples summed over engines (data-parallel engines each report their own), by the names gauges() and
# counters() give them.
_GAUGES = {"vllm:num_requests_running{": "running", "vllm:num_requests_waiting{": "waiting"}
_COUNTERS = {"vllm:generation_tokens_total{": "generated", "vllm:iteration_tokens_total_count{": "steps"}


class ServerProcess:
    """`command` + `args` + `--host 127.0.0.1 --port <free port>`, logging to `log_path`.

    Nothing runs until `start()` (or a `with` block, which starts it unless it was), so a caller can show `command`
    first. `env` is the whole environment of the server (default: this process's); PYTHONUNBUFFERED is set on top,
    so the log keeps up with the server.
    """

    def __init__(self, args: Sequence[object], log_path: str | os.PathLike, *, env: Mapping[str, str] | None = None,
                 start_timeout: float = 900, command: Sequence[str] = EMU3_SERVE):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [*command, *map(str, args), "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._log = None

    def start(self) -> ServerProcess:
        """Starts the server and returns once /health answers 200; raises RuntimeError with the log's tail if the
        server exits first or is not up within `start_timeout` seconds (and leaves nothing running either way)."""
        import httpx

        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        start = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; log {self.log_path}:\n"
                                       f"{self.log_tail()}")
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - start > self.start_timeout:
                    raise RuntimeError(f"server not up after {self.start_timeout} s; log {self.log_path}:\n"
                                       f"{self.log_tail()}")
                time.sleep(2)
        except BaseException:  # an interrupted wait too: a half-started server would hold its cores and memory
            self.stop()
            raise
        self.start_seconds = time.monotonic() - start
        return self

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def client(self, **kwargs):
        """An `openai.OpenAI` client for the server; no retries unless asked for, so a test sees every error."""
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="EMPTY", **{"max_retries": 0, **kwargs})

    def metric_sums(self, names: Mapping[str, str], timeout: float = 60) -> dict[str, float]:
        """The /metrics samples whose line starts with each key of `names` (a metric name and `{`), summed over
        their labels, under that key's value."""
        import httpx

        totals = dict.fromkeys(names.values(), 0.0)
        for line in httpx.get(self.url + "/metrics", timeout=timeout).text.splitlines():
            for prefix, name in names.items():
                if line.startswith(prefix):
                    totals[name] += float(line.rsplit(" ", 1)[1])
        return totals

    def gauges(self) -> dict[str, float]:
        """vLLM's running and waiting request gauges, summed over engines."""
        return self.metric_sums(_GAUGES, timeout=10)

    def counters(self) -> dict[str, float]:
        """vLLM's cumulative counters, summed over engines: tokens generated and engine steps."""
        return self.metric_sums(_COUNTERS)

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 60 s; then SIGKILL to whatever of the group is left (engine
        processes can outlive the API server). Safe to call again."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
