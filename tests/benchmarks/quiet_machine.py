"""Measuring on a shared machine: wait until other processes leave the cores alone, record how
busy they kept them during a phase, and say which code and machine produced a figure."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BUSY_WARNING_CORES = 0.1  # other processes' load above which a phase counts as disturbed


def cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process and its waited-for children, stolen)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    return (user + nice + system + irq + softirq) / tick, own, steal / tick


def other_load(seconds: float) -> float:
    """Cores kept busy by other processes over the next ``seconds``."""
    busy0, own0, _ = cpu_seconds()
    time.sleep(seconds)
    busy1, own1, _ = cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


def wait_for_idle(max_wait: float) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes leave the CPUs alone."""
    start = time.perf_counter()
    while (load := other_load(2.0)) > BUSY_WARNING_CORES and time.perf_counter() - start < max_wait:
        print(f"[bench] waiting: other processes use {load:.2f} cores", file=sys.stderr, flush=True)
    return time.perf_counter() - start


def measured(phase: Callable[[], dict[str, Any]], retries: int, idle_timeout: float) -> dict[str, Any]:
    """Run ``phase()`` once the machine is idle and record how busy other processes kept the CPUs
    meanwhile (``other_processes_cores``). A disturbed run is repeated (``retries``); the least
    disturbed attempt is kept and every attempt is listed."""
    attempts = []
    for _ in range(1 + retries):
        waited = wait_for_idle(idle_timeout)
        busy0, own0, steal0 = cpu_seconds()
        start = time.perf_counter()
        result = phase()
        wall = time.perf_counter() - start
        busy1, own1, steal1 = cpu_seconds()
        result["phase_wall_seconds"] = round(wall, 2)
        result["waited_for_idle_seconds"] = round(waited, 1)
        result["other_processes_cores"] = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 3)
        result["steal_cores"] = round((steal1 - steal0) / wall, 3)
        attempts.append(result)
        if result["other_processes_cores"] <= BUSY_WARNING_CORES:
            break
        print(f"[bench] disturbed: other processes used {result['other_processes_cores']:.2f} cores",
              file=sys.stderr, flush=True)
    best = min(attempts, key=lambda r: r["other_processes_cores"])
    best["attempts"] = [{"tokens_per_second": r.get("stats", r)["tokens_per_second"],
                         "other_processes_cores": r["other_processes_cores"]} for r in attempts]
    return best


def git_state(repo: Path) -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=repo)
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "modified_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu_model": first("/proc/cpuinfo", "model name"),
            "memory_total": first("/proc/meminfo", "MemTotal"), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
