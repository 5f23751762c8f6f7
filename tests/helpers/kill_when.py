"""Send a signal to a process (group) once a generate folder's manifest names enough images.

It runs as its own process (`signal_at` starts it), so that the moment of the kill depends on neither the test
process's scheduling nor anything else running in it: `python -m helpers.kill_when OUT COUNT PID SIGNAL [--group]`
from tests/. Exits 0 after signalling, 1 if the process ended first, 2 after 600 s without enough images.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.env import subprocess_env
from helpers.outputs import read_manifest

TESTS = Path(__file__).resolve().parent.parent


def signal_at(out, proc: subprocess.Popen, images: int, signum: int, group: bool = False) -> subprocess.Popen:
    """The watcher that sends `signum` to `proc` (its whole process group with `group`) once `out`'s manifest names
    `images` images."""
    return subprocess.Popen([sys.executable, "-m", "helpers.kill_when", str(out), str(images), str(proc.pid),
                             str(int(signum)), *(["--group"] if group else [])], cwd=TESTS, env=subprocess_env())


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def main() -> int:
    out, count, pid, signum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    group = "--group" in sys.argv[5:]
    try:  # ahead of the engine's busy threads on the same cores, where allowed (CI runs as root)
        os.nice(-10)
    except OSError:
        pass
    deadline = time.monotonic() + 600
    while sum("file" in record for record in read_manifest(out)) < count:
        if not running(pid):
            return 1
        if time.monotonic() > deadline:
            return 2
        time.sleep(0.01)
    (os.killpg if group else os.kill)(pid, signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
