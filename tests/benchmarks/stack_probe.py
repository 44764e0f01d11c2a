"""Shared by overload.py and soak.py: start a `pdserve up` stack, sample every process's RSS,
stream chat completions from many asyncio clients, recording how each ended, and report a run."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pdserve.chaos.client import metric, wait_for  # noqa: E402
from pdserve.stack_processes import stack_pids  # noqa: E402
from tests.service_fixture import free_port, wait_until_ready  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "ignore_eos": True, "temperature": 0, "stream": True}


@dataclass
class Stack:
    proc: subprocess.Popen
    url: str
    run_dir: Path
    command: list[str]

    def pids(self) -> list[int]:
        return stack_pids(self.run_dir)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def start_stack(flags: list[str]) -> Stack:
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-probe-"))
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--run-dir",
           str(tmp / "run"), *flags]
    proc = subprocess.Popen(cmd, stdout=(tmp / "stack.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, 600, alive=lambda: proc.poll() is None):
        raise RuntimeError(f"the stack did not start: {(tmp / 'stack.log').read_text()[-2000:]}")
    return Stack(proc, url, tmp / "run", cmd[2:])


def process_name(pid: int) -> str:
    """The stage id the launcher gave a child (PDSERVE_STAGE_ID), else its command's last word."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"PDSERVE_STAGE_ID="):
                return item.split(b"=", 1)[1].decode()
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].decode()
    except OSError:
        return str(pid)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples every stack process's RSS (MiB) every `interval` seconds in a thread."""

    def __init__(self, stack: Stack, interval: float = 0.5) -> None:
        self.stack, self.interval = stack, interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = {}
            for pid in self.stack.pids():
                value = rss_mib(pid)
                if value is not None:
                    now[process_name(pid)] = value
            self.samples.append((time.monotonic(), now))
            self._stop.wait(self.interval)

    def peak(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, sample in self.samples:
            for name, value in sample.items():
                out[name] = round(max(out.get(name, 0.0), value), 1)
        return out

    def at(self, moment: float) -> dict[str, float]:
        """The first sample at or after `moment` (monotonic)."""
        return next((s for t, s in self.samples if t >= moment), self.samples[-1][1])


@dataclass
class Outcome:
    status: int
    seconds: float  # to the response's end (a 429: to its arrival)
    error_event: bool = False
    retry_after_ms: int | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)


async def client_loop(session: aiohttp.ClientSession, url: str, max_tokens: int, until: float,
                      load: Load, honour_retry: bool) -> None:
    body = {**BODY, "max_tokens": max_tokens}
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    await r.read()
                    ms = r.headers.get("retry-after-ms")
                    load.outcomes.append(Outcome(r.status, time.monotonic() - started,
                                                 retry_after_ms=int(ms) if ms else None))
                    if honour_retry and ms:
                        await asyncio.sleep(min(int(ms), 2000) / 1000)
                    continue
                error = False
                async for line in r.content:
                    if line.startswith(b"data: {\"error\""):
                        error = True
                load.outcomes.append(Outcome(200, time.monotonic() - started, error_event=error))
        except aiohttp.ClientError as exc:
            load.outcomes.append(Outcome(-1, time.monotonic() - started, error_event=True))
            print(f"client error: {exc}", file=sys.stderr)


async def run_load(url: str, clients: int, seconds: float, max_tokens: int, honour_retry: bool) -> Load:
    load = Load()
    until = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client_loop(session, url, max_tokens, until, load, honour_retry)
                               for _ in range(clients)))
    return load


@dataclass
class LoadRun:
    """One load's outcomes, when it ran (monotonic) and how long the stack took to settle after."""

    load: Load
    started: float
    ended: float
    settled_s: float | None


def load_then_settle(stack: Stack, clients: int, seconds: float, max_tokens: int,
                     honour_retry: bool, settle_timeout: float) -> LoadRun:
    started = time.monotonic()
    load = asyncio.run(run_load(stack.url, clients, seconds, max_tokens, honour_retry=honour_retry))
    ended = time.monotonic()
    return LoadRun(load, started, ended, settled(stack.url, settle_timeout))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))], 4)


def settled(url: str, timeout: float) -> float | None:
    """Seconds until no request runs or waits and no KV block is held (None: not within timeout)."""
    start = time.monotonic()
    ok = wait_for(lambda: metric(url, "pdserve:kv_cache_usage_perc") == 0.0
                  and metric(url, "pdserve:num_requests_running") == 0
                  and metric(url, "pdserve:num_requests_waiting") == 0, timeout)
    return round(time.monotonic() - start, 2) if ok else None


def p50_p99(values: list[float]) -> dict[str, float | None]:
    return {"p50": pct(values, 50), "p99": pct(values, 99)}


def outcome_counts(load: Load) -> dict[str, int]:
    """How many requests ended with each HTTP status (-1: a client error)."""
    return dict(Counter(str(o.status) for o in load.outcomes))


def probe(url: str) -> tuple[int, float]:
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120)
    return r.status_code, round(time.monotonic() - started, 3)


def save(out: Path | None, result: dict) -> None:
    print(json.dumps(result, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every stack probe takes last: where to save the result, extra `pdserve up` flags."""
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("flags", nargs="*", help="extra pdserve up flags (after --)")


def run_header(script: str, stack: Stack) -> dict:
    """When, where and with which commands a result was measured."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "command": f"python tests/benchmarks/{script} " + " ".join(sys.argv[1:]),
        "stack": " ".join(stack.command),
    }


def measure_and_save(flags: list[str], measure: Callable[[Stack], dict], out: Path | None) -> None:
    """Start a stack, measure it, stop it (also when measuring fails), then print and save the
    result with the stack's exit status."""
    stack = start_stack(flags)
    try:
        result = measure(stack)
    finally:
        code = stack.stop()
    result["stack_exit_status"] = code
    save(out, result)
