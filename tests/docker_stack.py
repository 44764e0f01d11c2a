"""Helpers of the real-engine compose test (tests/test_docker_stack.py): a Docker engine, a base
image built from Debian packages, the image build, and streaming chat completions."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The README's commands, word for word after `docker compose` (or `docker-compose`); the project
# name comes from COMPOSE_PROJECT_NAME so that they need no -p.
UP_DISAGG = "--profile disagg up -d --scale worker=0 --scale decode-worker=3"
SCALE_TO_ONE = "--profile disagg up -d --scale worker=0 --scale decode-worker=1"
SCALE_TO_TWO = "--profile disagg up -d --scale worker=0 --scale decode-worker=2"
DOWN = "--profile disagg down"
BASE_IMAGE = "pdserve-test/bookworm-py311:latest"
BASE_CACHE = Path(os.environ.get("PDSERVE_DOCKER_CACHE", "~/.cache/pdserve-docker")).expanduser()
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
WHEEL_PORT = 38765


class Unavailable(Exception):
    """No engine, compose or base image can be had here; the message says why."""


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def engine_answers() -> bool:
    try:
        return shutil.which("docker") is not None and run(["docker", "info"], timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_engine(log_dir: Path) -> subprocess.Popen | None:
    """An engine that answers: the one running, or a `dockerd` started here (root only).

    Returns the dockerd process this call started (the caller stops it), or None."""
    if engine_answers():
        return None
    if shutil.which("docker") is None:
        raise Unavailable("no docker client (apt-get install docker.io)")
    if shutil.which("dockerd") is None:
        raise Unavailable("no engine answers `docker info` and there is no dockerd to start "
                          "(apt-get install docker.io)")
    if os.geteuid() != 0:
        raise Unavailable("no engine answers `docker info` and dockerd needs root to start")
    log = open(log_dir / "dockerd.log", "w")
    proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"dockerd exited with {proc.returncode}; see {log_dir / 'dockerd.log'}")
        if engine_answers():
            return proc
        time.sleep(1)
    proc.terminate()
    raise Unavailable("dockerd started but `docker info` did not answer within 60 s")


def compose_command() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else `docker-compose` (v1.29 reads the
    same files, profiles and --scale)."""
    if run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise Unavailable("neither `docker compose` nor `docker-compose` is installed "
                      "(apt-get install docker-compose)")


def ensure_base_image() -> str:
    """A minimal Debian bookworm with Python 3.11, from Debian's packages (Docker Hub is not
    reachable here): imported from the cached root file system, built once with mmdebstrap or
    debootstrap. PDSERVE_TEST_BASE_IMAGE names another base instead."""
    if os.environ.get("PDSERVE_TEST_BASE_IMAGE"):
        return os.environ["PDSERVE_TEST_BASE_IMAGE"]
    if run(["docker", "image", "inspect", BASE_IMAGE], timeout=60).returncode == 0:
        return BASE_IMAGE
    tarball = BASE_CACHE / "bookworm-py311.tar"
    if not tarball.is_file():
        BASE_CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        if shutil.which("mmdebstrap"):
            done = run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                        str(partial), "http://deb.debian.org/debian"], timeout=900)
        elif shutil.which("debootstrap") and os.geteuid() == 0:
            with tempfile.TemporaryDirectory() as root:
                done = run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                            root, "http://deb.debian.org/debian"], timeout=900)
                if done.returncode == 0:
                    done = run(["tar", "-C", root, "-cf", str(partial), "."], timeout=300)
        else:
            raise Unavailable("no base image: Docker Hub is unreachable and neither mmdebstrap nor "
                              "debootstrap is installed (apt-get install mmdebstrap)")
        if done.returncode != 0:
            raise Unavailable(f"building the Debian root file system failed: {done.stderr[-2000:]}")
        partial.rename(tarball)
    done = run(["docker", "import", str(tarball), BASE_IMAGE], timeout=300)
    if done.returncode != 0:
        raise Unavailable(f"docker import failed: {done.stderr[-2000:]}")
    return BASE_IMAGE


@dataclass
class WheelServer:
    """Local wheel directories served over http to `docker build --network host` (pip's
    find-links), e.g. the CPU torch wheel where download.pytorch.org is not reachable."""

    directories: list[Path]
    _servers: list[http.server.ThreadingHTTPServer] = field(default_factory=list)

    def start(self) -> list[str]:
        """Serve each directory; fixed ports when free, since the build argument naming them is
        part of the layer cache key (a new port would rebuild every layer)."""
        urls = []
        for i, directory in enumerate(self.directories):
            handler = functools.partial(_QuietHandler, directory=str(directory))
            try:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT + i), handler)
            except OSError:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
            urls.append(f"http://127.0.0.1:{server.server_address[1]}/")
        return urls

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: ARG002
        pass


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def build_args(base_image: str, find_links: list[str]) -> dict[str, str]:
    """The Dockerfile's build arguments for this machine: the Debian base, and where torch's
    CPU wheel comes from (its index when reachable, else local wheels)."""
    args = {"BASE_IMAGE": base_image}
    if find_links:
        args["PIP_FIND_LINKS"] = " ".join(find_links)
    if not resolves("download.pytorch.org"):
        args["TORCH_INDEX_URL"] = ""
    if os.environ.get("PIP_CERT"):  # pip here trusts an extra CA (TLS interception) the image lacks
        args["PIP_TRUSTED_HOST"] = "pypi.org files.pythonhosted.org"
    return args


def local_wheel_dirs() -> list[Path]:
    """pip's find-links directories on this machine that hold a CPU torch wheel."""
    spec = os.environ.get("PIP_FIND_LINKS", "")
    dirs = [Path(p) for p in spec.split() if p and not p.startswith(("http:", "https:"))]
    return [d for d in dirs if d.is_dir() and any(d.glob("torch-*+cpu-*.whl"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Completion:
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_token_at: float | None = None


async def stream_chat(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Completion:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    out = Completion()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"{resp.status_code} {(await resp.aread()).decode()[:300]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    out.error = json.dumps(chunk["error"])
                    continue
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        out.text += choice["delta"]["content"]
                        out.chunks += 1
                        out.first_token_at = out.first_token_at or time.monotonic()
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def long_prompt(i: int) -> str:
    """Well over --max-local-prefill-tokens (64) uncached tokens, different from the start, so
    that the prompt is prefilled on the prefill worker and its KV moves to a decode worker."""
    words = " ".join(f"item{i}-{j}" for j in range(40))
    return f"Request {i}: list these back in order, then count them: {words}."


def wait_ready(url: str, timeout: float) -> float:
    """Seconds until GET /ready answers 200."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            resp = httpx.get(f"{url}/ready", timeout=2)
            if resp.status_code == 200:
                return time.monotonic() - start
            last = resp.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/ready not 200 after {timeout} s: {last}")


def workers(url: str) -> list[dict]:
    return httpx.get(f"{url}/workers", timeout=5).json()


def run_requests(url: str, prompts: list[str], max_tokens: int) -> list[Completion]:
    async def main() -> list[Completion]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
            return await asyncio.gather(*(stream_chat(client, url, p, max_tokens) for p in prompts))
    return asyncio.run(main())
