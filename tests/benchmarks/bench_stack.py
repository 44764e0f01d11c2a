"""Shared by bench_service.py and bench_structured.py: a `pdserve up` on a free port, ready before
the load and stopped after it, and the result file stamped with when, by which command, on which
code and which machine it was measured."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from quiet_machine import git_state, machine_info  # noqa: E402 (beside this script)
from tests.service_fixture import free_port, wait_until_ready  # noqa: E402


@contextmanager
def served(flags: list[str], log: Path, ready_timeout: float, stop_timeout: float, *,
           log_tail: int = 2000, not_ready: Callable[[str], BaseException] = RuntimeError,
           cwd: Path | None = None) -> Iterator[tuple[str, list[str]]]:
    """`pdserve up --port <free port> *flags`, its output in `log`: yields (url, command) once it is
    ready, and stops it (SIGTERM) on the way out. Not ready within `ready_timeout` (or exited):
    raises `not_ready(the log's last log_tail characters)`."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), *flags]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        if not wait_until_ready(url, ready_timeout, alive=lambda: proc.poll() is None):
            raise not_ready(log.read_text()[-log_tail:])
        yield url, cmd
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=stop_timeout)


def save_result(output: str | Path, fields: dict) -> dict:
    """Write `fields` to `output` (JSON) between the date and command that measured them and the
    git state and machine they were measured on; returns what was written."""
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv]), **fields,
              "git": git_state(REPO), "machine": machine_info()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1))
    return result
