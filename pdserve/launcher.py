"""`pdserve up`: start every stage as its own process, wait until ready, stop them all cleanly.

Children are `pdserve <stage>` processes sharing one run directory (their ipc sockets) and the
launcher's settings through PDSERVE_* variables. They run in their own session, so a terminal's
Ctrl-C reaches only the launcher, which then stops them in order; on Linux each child also gets
SIGTERM if the launcher itself dies (no orphans). A tokenizer or detokenizer that exits is
respawned at once (they are stateless: the gateway sends a dead tokenizer's requests to another,
the scheduler fails a dead detokenizer's with an error), unless it keeps dying (RESPAWN_LIMIT in
RESPAWN_WINDOW seconds). A model worker that exits is only reported while other workers remain
(the scheduler moves its requests), and respawned with --restart-workers. The scheduler and the
gateway are fatal: if one exits, the launcher reports it and shuts the rest down (exit status 1).
Workers are stopped with SIGINT (at once); SIGTERM to one worker by hand drains it instead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from protocol.endpoints import Endpoints
from protocol.config import (
    CacheSettings,
    ConfigError,
    EndpointSettings,
    GatewaySettings,
    LaunchSettings,
    ModelSettings,
    SchedulerSettings,
    StageSettings,
    add_settings_arguments,
    env_name,
    settings_from,
)

GROUPS = (ModelSettings, CacheSettings, SchedulerSettings, GatewaySettings, LaunchSettings,
          StageSettings, EndpointSettings)
STOP_GRACE_SECONDS = 10.0
RESPAWN_LIMIT, RESPAWN_WINDOW = 5, 60.0  # more exits than this in the window: give up
RESPAWNED_STAGES = ("tokenizer", "detokenizer")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    cmd: list[str]
    env: dict[str, str]

    @property
    def stage(self) -> str:
        return self.cmd[-1]

    @property
    def is_worker(self) -> bool:
        return self.stage == "worker"


def worker_plan(launch: LaunchSettings) -> list[tuple[str, str]]:
    """(stage id, role) of each model worker `pdserve up` starts."""
    return ([(f"prefill-{i}", "prefill") for i in range(launch.prefill_workers)]
            + [(f"decode-{i}", "decode") for i in range(launch.decode_workers)]
            + [(f"worker-{i}", "mixed") for i in range(launch.num_mixed_workers)])


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the whole pipeline and serve the OpenAI API")
    for group in GROUPS:
        add_settings_arguments(p, group)
    p.set_defaults(run=run)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


def child_env(settings: list, run_dir: Path) -> dict[str, str]:
    """The launcher's settings as PDSERVE_* variables, so every child sees the same values."""
    import msgspec

    env = dict(os.environ)
    for group in settings:
        for f in msgspec.structs.fields(group):
            value = getattr(group, f.name)
            if value is not None:
                env[env_name(f.name)] = str(value).lower() if isinstance(value, bool) else str(value)
    env[env_name("run_dir")] = str(run_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(args: argparse.Namespace) -> int:
    try:
        s = {g.__name__: settings_from(g, args) for g in GROUPS}
    except (ConfigError, ValueError) as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 2
    launch: LaunchSettings = s["LaunchSettings"]
    gw: GatewaySettings = s["GatewaySettings"]
    ep: EndpointSettings = s["EndpointSettings"]
    own_run_dir = ep.run_dir is None and not ep.is_tcp
    run_dir = Path(tempfile.mkdtemp(prefix="pdserve-")) if own_run_dir else Path(ep.run_dir or ".")
    env = child_env(list(s.values()), run_dir)
    workers = worker_plan(launch)
    cpu_threads = max(1, (os.cpu_count() or 1) // len(workers))
    threads = {env_name("torch_threads"): str(cpu_threads)} if s["StageSettings"].torch_threads is None else {}
    plan = [("scheduler", "scheduler", {})]
    plan += [("worker", stage_id, {env_name("role"): role, **threads}) for stage_id, role in workers]
    plan += [("tokenizer", f"tokenizer-{i}", {}) for i in range(launch.tokenizers)]
    plan += [("detokenizer", f"detokenizer-{i}", {}) for i in range(launch.detokenizers)]
    plan += [("gateway", "gateway", {})]
    children: list[Child] = []
    stopping = False
    exits: dict[str, list[float]] = {}  # name -> when it exited, within RESPAWN_WINDOW

    def on_signal(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        for stage, stage_id, extra in plan:
            cmd = [sys.executable, "-m", "pdserve.cli", "--log-level", args.log_level, stage]
            children.append(_spawn(stage_id, cmd, {**env, env_name("stage_id"): stage_id, **extra}))
        url = f"http://{gw.host}:{gw.port}"
        if not _wait_ready(url, children, launch.ready_timeout, lambda: stopping):
            status = 1 if not stopping else 0
            return status
        print(f"pdserve is ready: {url}/v1 (model {s['ModelSettings'].model})", flush=True)
        where = tcp_flags(ep) if ep.is_tcp else f"--run-dir {run_dir}"
        print(f"pdserve: add a decode worker with `pdserve worker --role decode {where}`; "
              "SIGTERM to a worker drains it", flush=True)
        while not stopping:
            dead = _first_exited(children)
            if dead is not None and dead.stage in RESPAWNED_STAGES:
                code = dead.proc.returncode
                now = time.monotonic()
                recent = [t for t in exits.get(dead.name, []) if now - t < RESPAWN_WINDOW] + [now]
                exits[dead.name] = recent
                if len(recent) > RESPAWN_LIMIT:
                    print(f"pdserve up: {dead.name} (pid {dead.proc.pid}) exited {len(recent)} times "
                          f"in {RESPAWN_WINDOW:.0f} s (last status {code}); shutting down",
                          file=sys.stderr, flush=True)
                    status = 1
                    break
                print(f"pdserve up: {dead.name} exited with status {code}; restarting it",
                      file=sys.stderr, flush=True)
                children.remove(dead)
                children.append(_spawn(dead.name, dead.cmd, dead.env))
                continue
            if dead is not None:
                code = dead.proc.returncode
                live_workers = [c for c in children if c.is_worker and c.proc.poll() is None]
                if not dead.is_worker or (not live_workers and not launch.restart_workers):
                    print(f"pdserve up: {dead.name} (pid {dead.proc.pid}) exited with status "
                          f"{code}; shutting down", file=sys.stderr, flush=True)
                    status = 1
                    break
                children.remove(dead)
                if launch.restart_workers:
                    print(f"pdserve up: worker {dead.name} exited with status {code}; restarting it",
                          file=sys.stderr, flush=True)
                    children.append(_spawn(dead.name, dead.cmd, dead.env))
                else:
                    print(f"pdserve up: worker {dead.name} exited with status {code}; "
                          f"{len(live_workers)} worker(s) keep serving", file=sys.stderr, flush=True)
            time.sleep(0.2)
        return status
    finally:
        _stop_all(children)
        if own_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not ep.is_tcp:
            for path in [*Endpoints.ipc(run_dir).ipc_paths(), *Path(run_dir).glob("kv-*.sock")]:
                path.unlink(missing_ok=True)


def tcp_flags(ep: EndpointSettings) -> str:
    """The endpoint flags another stage needs to join a tcp stack."""
    pairs = [("tcp_host", ep.tcp_host), ("tcp_base_port", ep.tcp_base_port),
             ("scheduler_host", ep.scheduler_host), ("gateway_host", ep.gateway_host)]
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in pairs if value is not None)


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> Child:
    return Child(name, subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent), cmd, env)


def _wait_ready(url: str, children: list[Child], timeout: float, stopping) -> bool:
    deadline = time.monotonic() + timeout
    reason = "starting"
    while time.monotonic() < deadline and not stopping():
        dead = _first_exited(children)
        if dead is not None:
            print(f"pdserve up: {dead.name} exited with status {dead.proc.returncode} while "
                  "starting; shutting down", file=sys.stderr, flush=True)
            return False
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as resp:
                if resp.status == 200 and _pipeline_complete(url):
                    return True
                reason = "waiting for every tokenizer and detokenizer"
        except urllib.error.HTTPError as exc:
            reason = exc.read().decode(errors="replace")[:200]
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    if not stopping():
        print(f"pdserve up: not ready after {timeout:.0f} s ({reason}); shutting down",
              file=sys.stderr, flush=True)
    return False


def _pipeline_complete(url: str) -> bool:
    """At start-up: every tokenizer and detokenizer launched is live (/health); later the stack
    serves with fewer (degraded), but it starts whole."""
    with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
        stages = json.loads(resp.read())["stages"]
    return all(stages[k]["live"] >= stages[k]["expected"] for k in ("tokenizers", "detokenizers"))


def _first_exited(children: list[Child]) -> Child | None:
    return next((c for c in children if c.proc.poll() is not None), None)


def _stop_all(children: list[Child]) -> None:
    """Stop everyone (gateway first, so no new requests come in), then SIGKILL stragglers.
    Workers get SIGINT: SIGTERM would make them drain, which needs the scheduler."""
    for c in reversed(children):
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGINT if c.is_worker else signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
