"""Where the engine process spends its host CPU during one workload: each thread's CPU
use from /proc (cores busy, e.g. 0.9 = 90 % of one core), and optionally py-spy
profiles of every thread (`--py-spy`, py-spy on PATH): one over wall time (`idle`:
waiting, on the GIL too, counts where it happens) and one of the thread holding the GIL
(`gil`). The difference between the two shows what the engine loop waits for. Linux only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Thread id -> (name, user + system CPU ticks so far) of every thread of `pid`."""
    ticks: dict[int, tuple[str, int]] = {}
    for entry in os.scandir(f"/proc/{pid}/task"):
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return ticks


class HostProbe:
    """`with HostProbe(pid, "W2-lora", py_spy_dir)`: measures the block; `result()` after."""

    def __init__(self, pid: int, label: str, py_spy_dir: Path | None = None) -> None:
        self.pid = pid
        self.label = label
        self.py_spy_dir = py_spy_dir
        self._before: dict[int, tuple[str, int]] = {}
        self._started = 0.0
        self._elapsed = 0.0
        self._spies: list[subprocess.Popen] = []

    def __enter__(self) -> HostProbe:
        if self.py_spy_dir is not None:
            self._start_py_spy()
        self._before = thread_ticks(self.pid)
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._elapsed = time.monotonic() - self._started
        self._after = thread_ticks(self.pid)
        for spy in self._spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                spy.kill()

    def result(self) -> dict[str, Any]:
        """Cores busy per thread (the busiest eight, the main thread marked) and in all."""
        busy = []
        for tid, (name, ticks) in self._after.items():
            used = (ticks - self._before.get(tid, (name, 0))[1]) / _TICKS_PER_S
            label = f"{name} (main)" if tid == self.pid else f"{name} {tid}"
            busy.append((used / self._elapsed if self._elapsed else 0.0, label))
        busy.sort(reverse=True)
        return {
            "seconds": self._elapsed,
            "cores_busy_total": sum(share for share, _ in busy),
            "cores_busy_by_thread": {label: round(share, 3) for share, label in busy[:8]},
        }

    def _start_py_spy(self) -> None:
        py_spy = shutil.which("py-spy") or "py-spy"  # bench_serving checked it is on PATH
        self.py_spy_dir.mkdir(parents=True, exist_ok=True)
        for mode in ("idle", "gil"):
            out = self.py_spy_dir / f"{self.label}.{mode}.txt"
            command = [
                py_spy, "record", "--pid", str(self.pid), "--rate", "200", "--threads",
                "--nonblocking", "--format", "raw", "--output", str(out), f"--{mode}",
            ]  # fmt: skip
            with (self.py_spy_dir / f"{self.label}.{mode}.log").open("w") as log:
                self._spies.append(subprocess.Popen(command, stdout=log, stderr=log))
