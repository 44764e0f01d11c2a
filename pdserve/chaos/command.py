"""`pdserve chaos`: start a stack with `pdserve up`, fault random stages under streaming load,
print and save the figures (events survived, requests affected, recovery p50/p99).

    pdserve chaos --events 40 --seed 1 --out bench-results/chaos.json

The stack is started with UP_ARGS (by default 2 tokenizers, 2 detokenizers, 2 workers with
--restart-workers, a 3 s liveness timeout and the integrity check every second) and stopped at
the end; the exit status is 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pdserve.chaos.client import wait_for
from pdserve.chaos.runner import ACTIONS, STAGES, ChaosRun
from pdserve.stack_processes import stack_pids

DEFAULT_UP_ARGS = ("--tokenizers 2 --detokenizers 2 --workers 2 --restart-workers "
                   "--heartbeat-interval 0.5 --liveness-timeout 3 --check-integrity-interval 1")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="fault random stages of a stack under load and check it recovers")
    p.add_argument("--events", type=int, default=10, help="faults to inject (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault choices (default 0)")
    p.add_argument("--concurrency", type=int, default=4, help="streams kept running (default 4)")
    p.add_argument("--pause-seconds", type=float, default=5.0, help="SIGSTOP length (default 5)")
    p.add_argument("--deadline", type=float, default=15.0,
                   help="seconds every request in flight at a fault must end within (default 15)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"stages to fault (default {','.join(STAGES)})")
    p.add_argument("--actions", default=",".join(ACTIONS), help="kill,pause (default both)")
    p.add_argument("--port", type=int, default=8700, help="the stack's HTTP port (default 8700)")
    p.add_argument("--up-args", default=DEFAULT_UP_ARGS, help=f"flags for pdserve up (default: {DEFAULT_UP_ARGS})")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.set_defaults(run=run)


def _liveness(up_args: str) -> float:
    words = shlex.split(up_args)
    return float(words[words.index("--liveness-timeout") + 1]) if "--liveness-timeout" in words else 10.0


def run(args: argparse.Namespace) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="pdserve-chaos-"))
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(args.port), "--run-dir",
           str(run_dir / "run"), *shlex.split(args.up_args)]
    log_path = run_dir / "stack.log"
    print(f"pdserve chaos: starting {' '.join(cmd[2:])} (log {log_path})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"

    def whole() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    try:
        if not wait_for(lambda: proc.poll() is not None or whole(), 600, interval=0.5) or proc.poll() is not None:
            print(f"pdserve chaos: the stack did not start:\n{log_path.read_text()[-3000:]}", file=sys.stderr)
            return 2
        started = time.time()
        chaos = ChaosRun(url, lambda: stack_pids(run_dir / "run"), seed=args.seed,
                         concurrency=args.concurrency, pause_seconds=args.pause_seconds,
                         deadline=args.deadline, liveness_timeout=_liveness(args.up_args),
                         stages=tuple(args.stages.split(",")),
                         actions=tuple(args.actions.split(",")))
        report = chaos.run(args.events)
        summary = report.summary()
        summary.update(command="pdserve chaos " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
                       up_command=" ".join(cmd[2:]), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
                       seconds=round(time.time() - started, 1), stack_alive=proc.poll() is None)
        if proc.poll() is not None:
            summary["violations"].append(f"pdserve up exited with {proc.returncode}")
        printable = {k: v for k, v in summary.items() if k != "by_event"}
        print(json.dumps(printable, indent=2))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2))
        return 1 if summary["violations"] else 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
