"""A small real sweep on the bundled model: two layouts and a broken one, two load points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.stack_processes import live_pids_with_env

pytestmark = pytest.mark.slow


def sweep_pids() -> list[int]:
    """Processes of any stack a sweep started (their environment names a pdserve-sweep- run dir)."""
    return live_pids_with_env(b"PDSERVE_RUN_DIR=", b"pdserve-sweep-")


def test_a_small_sweep_writes_results_table_and_plots_and_resumes(smollm2_dir: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
[experiment]
name = "tiny"
stack = "--model {smollm2_dir} --torch-threads 1 --max-local-prefill-tokens 0"

[layouts]
mixed = "--workers 2"
p1d1 = "--prefill-workers 1 --decode-workers 1"
broken = "--no-such-flag 3"

[workload]
num_prompts = 4
input_len = 24
output_len = 6

[load]
request_rates = [4]
concurrency = [2]

[slo]
ttft_ms = 60000
tpot_ms = 60000
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pdserve.cli", "sweep", str(exp), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # the broken layout failed
    results = json.loads((out / "results.json").read_text())
    assert [(p["layout"], p["kind"], p["load"]) for p in results["points"]] == [
        ("mixed", "rate", 4.0), ("mixed", "concurrency", 2.0), ("p1d1", "rate", 4.0), ("p1d1", "concurrency", 2.0)]
    for p in results["points"]:
        assert p["summary"]["completed"] == 4 and p["attainment"] == 1.0
        assert p["busy_seconds"] and all(v >= 0 for v in p["busy_seconds"].values())
    p1d1 = [p for p in results["points"] if p["layout"] == "p1d1"]
    assert all(p["server_phases"]["kv_transfers"] == 4 for p in p1d1)  # every prompt was split
    [failed] = results["failed"]
    assert failed["layout"] == "broken" and "no-such-flag" in failed["error"]
    assert results["layouts"]["p1d1"]["workers"] == 2 and results["layouts"]["mixed"]["workers"] == 2
    table = (out / "table.md").read_text()
    assert "| p1d1 | rate 4 | 0 | 100% |" in table and "recommended:" in table
    assert (out / "sweep-rate.png").stat().st_size > 0 and (out / "sweep-concurrency.png").stat().st_size > 0
    assert not sweep_pids()

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("stack-*.log")}
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["points"] == results["points"]  # nothing measured again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("stack-*.log") if p.name != "stack-broken.log"} == {
        k: v for k, v in stamps.items() if k != "stack-broken.log"}  # no stack started again
    assert not sweep_pids()


def test_a_bad_experiment_file_is_refused_with_the_key(tmp_path: Path) -> None:
    exp = tmp_path / "bad.toml"
    exp.write_text("[layouts]\nm = \"--workers 1\"\n[load]\nrequest_rates = [1]\n[slo]\nttft_msec = 5\n")
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "sweep", str(exp)], capture_output=True, text=True)
    assert done.returncode == 2 and "ttft_msec" in done.stderr
