"""Which live processes belong to a `pdserve up` stack, and which stage each runs.

The launcher gives every child `PDSERVE_RUN_DIR=<run dir>` in its environment, so /proc alone
tells a stack's processes apart (chaos faults them, a sweep checks none is left behind, the tests
count them). Linux only, as /proc is.
"""

from __future__ import annotations

from pathlib import Path


def is_zombie(pid: int) -> bool:
    """Exited but not yet reaped (or gone altogether)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def live_pids_with_env(*needles: bytes) -> list[int]:
    """Live processes whose environment contains every one of `needles`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if all(n in environ for n in needles) and not is_zombie(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def stack_pids(run_dir: Path | str) -> list[int]:
    """Live processes started by `pdserve up --run-dir run_dir`."""
    return live_pids_with_env(f"PDSERVE_RUN_DIR={run_dir}".encode())


def stage_pids(pids: list[int], stage: str) -> list[int]:
    """Of `pids`, the processes running `pdserve <stage>`."""
    out = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stage.encode() in argv:
            out.append(pid)
    return out
