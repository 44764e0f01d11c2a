"""The compose stack on a real Docker engine: build the image, `up` the disagg profile with three
decode workers, stream chat completions through the published gateway port, see every decode
worker serve, scale to one decode worker with requests in flight (none fails), scale back to two
(the new one registers and serves), `down`, nothing left running.

Runs where an engine answers `docker info` or can be started here (root and `dockerd`: Debian's
docker.io); otherwise it skips and says why. The base image is a Debian bookworm root file
system from Debian's packages (Docker Hub is not reachable), cached in ~/.cache/pdserve-docker,
so only the first run builds it. Select it with `pytest -m docker`.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.docker_stack import (
    DOWN,
    SCALE_TO_ONE,
    SCALE_TO_TWO,
    UP_DISAGG,
    Unavailable,
    WheelServer,
    build_args,
    compose_command,
    ensure_base_image,
    free_port,
    local_wheel_dirs,
    long_prompt,
    run,
    run_requests,
    start_engine,
    wait_ready,
    workers,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "pdserve:compose-test"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    try:
        dockerd = start_engine(tmp_path_factory.mktemp("dockerd"))
        compose = compose_command()
        base = ensure_base_image()
    except Unavailable as exc:
        pytest.skip(f"no Docker engine for the compose test: {exc}")
    yield compose, base
    if dockerd is not None:
        dockerd.terminate()
        dockerd.wait(60)


def test_disagg_stack_scales_decode_workers_without_failing_a_request(engine, capsys) -> None:
    compose, base = engine
    wheels = WheelServer(local_wheel_dirs())
    args = build_args(base, wheels.start())
    build_cmd = ["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "-t", IMAGE]
    build_cmd += [f for k, v in args.items() for f in ("--build-arg", f"{k}={v}")]
    started = time.monotonic()
    try:
        built = run([*build_cmd, "."], timeout=1200, cwd=ROOT)
    finally:
        wheels.stop()
    build_seconds = time.monotonic() - started
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    size = int(run(["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"]).stdout)

    port = free_port()
    project = f"pdserve-test-{os.getpid()}"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "PDSERVE_IMAGE": IMAGE, "PDSERVE_PORT": str(port),
           "PDSERVE_NUM_KV_BLOCKS": "256", "PDSERVE_TORCH_THREADS": "1", "PDSERVE_DRAIN_TIMEOUT": "30"}
    stack = [*compose, "--profile", "disagg"]
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        up = run([*compose, *UP_DISAGG.split()],
                 env=env, cwd=ROOT, timeout=600)
        assert up.returncode == 0, up.stderr[-3000:]
        wait_ready(url, 180)
        ready_seconds = time.monotonic() - started
        # /ready needs one ready worker; the others may still be loading the model.
        ready = {}
        while time.monotonic() - started < 240 and len(ready) < 4:
            ready = {w["id"]: w["role"] for w in workers(url) if w["state"] == "ready"}
            time.sleep(0.5)
        all_workers_seconds = time.monotonic() - started
        assert sorted(ready.values()) == ["decode", "decode", "decode", "prefill"], workers(url)
        decode = sorted(i for i, role in ready.items() if role == "decode")

        done = run_requests(url, [long_prompt(i) for i in range(12)], 24)
        assert [(c.error, c.finish_reason, c.chunks) for c in done] == [(None, "length", 24)] * 12
        table = {w["id"]: w for w in workers(url)}
        assert all(table[i]["steps"] > 0 and table[i]["transfers_done"] > 0 for i in decode), table

        # Scale to one decode worker while requests stream: the two stopped ones drain.
        results: dict[str, list] = {}
        flight = threading.Thread(target=lambda: results.update(
            done=run_requests(url, [long_prompt(100 + i) for i in range(9)], 64)))
        flight.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(w["running_requests"] for w in workers(url)):
            time.sleep(0.2)
        down_to_one = run([*compose, *SCALE_TO_ONE.split()],
                          env=env, cwd=ROOT, timeout=300)
        flight.join(300)
        assert down_to_one.returncode == 0, down_to_one.stderr[-3000:]
        assert [(c.error, c.finish_reason, c.chunks) for c in results["done"]] == [(None, "length", 64)] * 9
        states = sorted(w["state"] for w in workers(url) if w["role"] == "decode")
        assert states == ["drained", "drained", "ready"]
        listed = run([*stack, "ps", "-q", "decode-worker"], env=env, cwd=ROOT)
        assert len(listed.stdout.split()) == 1

        # A decode worker started into the running stack registers and gets work.
        before = {w["id"] for w in workers(url)}
        up_again = run([*compose, *SCALE_TO_TWO.split()], env=env, cwd=ROOT, timeout=300)
        assert up_again.returncode == 0, up_again.stderr[-3000:]
        joined: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not joined:
            joined = [w["id"] for w in workers(url) if w["id"] not in before and w["state"] == "ready"]
            time.sleep(0.5)
        assert len(joined) == 1, workers(url)
        done = run_requests(url, [long_prompt(200 + i) for i in range(6)], 16)
        assert [(c.error, c.finish_reason, c.chunks) for c in done] == [(None, "length", 16)] * 6
        newcomer = next(w for w in workers(url) if w["id"] == joined[0])
        assert newcomer["role"] == "decode" and newcomer["transfers_done"] > 0, newcomer
    finally:
        logs = run([*stack, "logs", "--no-color", "--tail", "30"], env=env, cwd=ROOT)
        down = run([*compose, *DOWN.split()], env=env, cwd=ROOT, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:] + logs.stdout[-4000:]
    left = run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"])
    assert left.stdout.split() == []
    assert run(["docker", "network", "ls", "-q", "--filter", f"name={project}"]).stdout.split() == []
    with capsys.disabled():
        print(f"\ncompose test: build {build_seconds:.0f} s, image {size / 1e9:.2f} GB, "
              f"up to /ready {ready_seconds:.1f} s, to all 4 workers ready {all_workers_seconds:.1f} s "
              f"({' '.join(compose)})")
