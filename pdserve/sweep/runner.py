"""Running a sweep: start each layout's stack, load it point by point with pdserve bench's own
client, scrape the server around each point, stop the stack and make sure nothing is left.

A stack is `pdserve up` in its own session and run directory, so its processes can be found
(their environment names the run directory) and checked gone afterwards.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pdserve.bench import server_phases
from pdserve.bench.client import ENDPOINT_PATHS, RequestRecord, build_payload, send_request, stream_session
from pdserve.bench.datasets import BenchRequest, random_requests, shared_prefix_requests, sharegpt_requests
from pdserve.bench.runner import poisson_arrival_times, run_schedule
from pdserve.stack_processes import stack_pids
from pdserve.sweep.experiment import Experiment, Layout


class StackFailed(RuntimeError):
    """A layout's stack did not start (bad flags, not ready in time); the message ends with its log."""


@dataclass
class Stack:
    url: str
    proc: subprocess.Popen | None = None  # None: a stack that was already running (base_url)
    run_dir: Path | None = None
    command: list[str] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stack(exp: Experiment, layout: Layout, log: Path, ready_timeout: float) -> Stack:
    if layout.base_url is not None:
        if not _ready(layout.base_url):
            raise StackFailed(f"{layout.base_url}/ready does not answer 200")
        return Stack(layout.base_url)
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="pdserve-sweep-"))
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--run-dir", str(run_dir),
           *exp.stack_flags, *layout.flags]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stack = Stack(f"http://127.0.0.1:{port}", proc, run_dir, cmd)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _ready(stack.url):
            return stack
        time.sleep(0.3)
    stop_stack(stack)
    tail = log.read_text(errors="replace")[-1500:]
    raise StackFailed(f"`{' '.join(cmd[2:])}` did not become ready (exit {proc.poll()}): {tail}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_stack(stack: Stack, timeout: float = 60.0) -> list[int]:
    """Stop a stack the sweep started; the pids of its processes still alive afterwards."""
    if stack.proc is None:
        return []
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(stack.proc.pid, signal.SIGKILL)
            stack.proc.wait()
    deadline = time.monotonic() + 10
    while (left := stack_pids(stack.run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if stack.run_dir is not None:
        shutil.rmtree(stack.run_dir, ignore_errors=True)
    return left


def build_workload(exp: Experiment, seed: int) -> list[BenchRequest]:
    w = exp.workload
    if w.dataset == "random":
        return random_requests(w.num_prompts, w.input_len, w.output_len, w.range_ratio, seed)
    if w.dataset == "shared-prefix":
        return shared_prefix_requests(w.num_prompts, w.num_prefixes, w.prefix_len, w.input_len,
                                      w.output_len, w.range_ratio, seed)
    return sharegpt_requests(Path(w.dataset_path or ""), w.num_prompts, seed)


async def run_point(url: str, requests: list[BenchRequest], kind: str, load: float, seed: int,
                    timeout: float = 600.0, on_done: Callable[[], object] | None = None) -> dict[str, Any]:
    """One load point: the records, duration, and the server's phases and workers around it.
    `on_done` is called as each request ends (progress)."""
    concurrency = int(load) if kind == "concurrency" else None
    rate = load if kind == "rate" else math.inf
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False) as client, \
            stream_session(concurrency) as session:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        target = url + ENDPOINT_PATHS["completions"]

        async def send(index: int, request: BenchRequest) -> RequestRecord:
            payload = build_payload("completions", model, request, True, 0.0)
            record = await send_request(session, target, payload, index, request.prompt_len, timeout)
            if on_done is not None:
                on_done()
            return record

        workers_before = (await client.get(f"{url}/workers")).json()
        before = await server_phases.scrape(client, url)
        result = await run_schedule(requests, send, poisson_arrival_times(len(requests), rate, seed),
                                    concurrency, timeout)
        await asyncio.sleep(1.0)  # phase records reach /metrics with the scheduler's stats
        phases = server_phases.breakdown(before, await server_phases.scrape(client, url))
        workers_after = (await client.get(f"{url}/workers")).json()
    return {"records": result.records, "duration": result.duration, "not_sent": result.not_sent,
            "server_phases": phases, "busy_seconds": _busy(workers_before, workers_after)}


def _busy(before: list[dict], after: list[dict]) -> dict[str, float]:
    """Seconds each worker spent computing during the point."""
    start = {w["id"]: w.get("busy_seconds", 0.0) for w in before}
    return {w["id"]: round(w.get("busy_seconds", 0.0) - start.get(w["id"], 0.0), 6) for w in after
            if w.get("state") == "ready"}
