"""Start and stop a real `pdserve up` (every stage a process, real sockets) for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from pdserve.stack_processes import stack_pids

MODEL = "smollm2-135m"  # the name a module's shared server answers to (--served-model-name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    run_dir: Path
    log: Path

    def child_pids(self) -> list[int]:
        """Every live process started for this server."""
        return stack_pids(self.run_dir)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def wait_until_ready(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll `url`/ready until it answers 200 with every tokenizer and detokenizer live (/health)
    (True), `alive()` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200 and _stages_complete(url):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _stages_complete(url: str) -> bool:
    stages = httpx.get(f"{url}/health", timeout=2).json()["stages"]
    return all(stages[k]["live"] >= stages[k]["expected"] for k in ("tokenizers", "detokenizers"))


def start_server(model_dir: Path, tmp: Path, *extra: str, ready_timeout: float = 180.0) -> Server:
    port = free_port()
    run_dir = tmp / "run"
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--model", str(model_dir), "--port", str(port),
           "--run-dir", str(run_dir), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if wait_until_ready(url, ready_timeout, alive=lambda: proc.poll() is None):
        return Server(proc, url, run_dir, log)
    if proc.poll() is not None:
        raise RuntimeError(f"pdserve up exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    proc.kill()
    raise RuntimeError(f"pdserve up not ready in {ready_timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running_server(model_dir: Path, tmp: Path, *extra: str) -> Iterator[Server]:
    """A started server for one test; on the way out it is stopped, and must exit with status 0."""
    srv = start_server(model_dir, tmp, *extra)
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"pdserve up exited with {code}"


def module_server(tmp_name: str, *flags: str):
    """A module-scoped pytest fixture `server`: one `pdserve up` on SmolLM2 serving as MODEL with
    `flags`, shared by the module's tests and stopped after them. (pytest is imported here, not at
    the top: the GPU benchmarks import this module on machines without it.)"""
    import pytest

    @pytest.fixture(scope="module")
    def server(smollm2_dir, tmp_path_factory):
        srv = start_server(smollm2_dir, tmp_path_factory.mktemp(tmp_name), "--served-model-name", MODEL,
                           *flags)
        yield srv
        srv.stop()

    return server


def at_once(n: int, call: Callable[[], object], join_timeout: float | None = None) -> list:
    """Run `call` in `n` threads started together; what each returned, in the order they finished
    (a thread still running after `join_timeout` adds nothing)."""
    results: list = []
    lock = threading.Lock()

    def run() -> None:
        value = call()
        with lock:
            results.append(value)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    return results


def stream_chats(url: str, model: str, conversations: list[list[dict]], max_tokens: int) -> list[tuple[str, int]]:
    """Greedy streamed chat completions, all at once, through the openai SDK: (text, completion
    tokens) of each, in order."""
    import asyncio

    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def one(messages: list[dict]) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True})
        text, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        return "".join(text), usage.completion_tokens

    async def all_() -> list[tuple[str, int]]:
        return list(await asyncio.gather(*(one(m) for m in conversations)))

    return asyncio.run(all_())
