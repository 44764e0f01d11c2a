"""Operations with real processes: API keys, overload, a dying worker, stages run alone, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pdserve.stack_processes import is_zombie
from tests.reliability_client import LONG_CHAT, metric, wait_for
from tests.service_fixture import at_once, free_port, running_server, start_server, wait_until_ready

pytestmark = pytest.mark.slow
CHAT = {**LONG_CHAT, "max_tokens": 400}


def test_api_key_overload_and_clean_shutdown(smollm2_dir, tmp_path):
    with running_server(smollm2_dir, tmp_path, "--api-key", "s3cret", "--max-num-seqs", "1",
                        "--max-waiting-requests", "1", "--max-num-batched-tokens", "64") as srv:
        url = f"{srv.url}/v1/chat/completions"
        assert httpx.post(url, json=CHAT).status_code == 401
        assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer wrong"}).status_code == 401
        r = httpx.get(f"{srv.url}/v1/models", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200  # no key for health checks

        auth = {"authorization": "Bearer s3cret"}

        # All 8 arrive at once: short requests still overlap, and finish on a slow CPU.
        def fire() -> tuple[int, str | None]:
            resp = httpx.post(url, json={**CHAT, "max_tokens": 40}, headers=auth, timeout=120)
            return resp.status_code, resp.headers.get("retry-after")

        started = time.monotonic()
        statuses = at_once(8, fire)
        refused = [s for s in statuses if s[0] == 429]
        assert refused and all(ra is not None for _, ra in refused), statuses
        assert any(s == 200 for s, _ in statuses), statuses
        assert time.monotonic() - started < 120
        pids = srv.child_pids()
        assert len(pids) == 5  # scheduler, worker, tokenizer, detokenizer, gateway
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)]
    assert not srv.child_pids()
    assert not list(srv.run_dir.glob("*.sock"))


def test_request_timeout_then_launcher_stops_everything_when_a_child_dies(smollm2_dir, tmp_path):
    srv = start_server(smollm2_dir, tmp_path, "--request-timeout", "2")
    try:
        for stream in (False, True):  # a request past --request-timeout is aborted with a 503
            started = time.monotonic()
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={**CHAT, "max_tokens": 4000, "stream": stream},
                           timeout=60)
            assert time.monotonic() - started < 10
            if stream and r.status_code == 200:  # the stream had begun: the error is its last event
                assert "timed out" in r.text and r.text.endswith("data: [DONE]\n\n")
            else:  # not streamed, or (on a loaded machine) timed out before its first token: a plain 503
                assert r.status_code == 503 and "timed out" in r.json()["error"]["message"]
        # The aborted requests' blocks are back.
        assert wait_for(lambda: metric(srv.url, "pdserve:kv_cache_usage_perc") == 0.0, 10)
        workers = [p for p in srv.child_pids() if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        code = srv.proc.wait(timeout=60)
        assert code == 1
        log = srv.log.read_text()
        assert "worker-0" in log and "exited" in log
        time.sleep(0.5)
        assert not srv.child_pids()
    finally:
        if srv.proc.poll() is None:  # a failed assertion above: do not leave the stack running
            srv.stop()


def test_stages_run_alone_and_a_dead_worker_fails_its_requests(smollm2_dir, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "PDSERVE_RUN_DIR": str(run_dir), "PDSERVE_MODEL": str(smollm2_dir),
           "PDSERVE_PORT": str(port), "PDSERVE_LIVENESS_TIMEOUT": "3", "PYTHONUNBUFFERED": "1"}
    procs = {}
    log = (tmp_path / "stages.log").open("w")
    try:
        for stage in ("scheduler", "worker", "tokenizer", "detokenizer", "gateway"):
            procs[stage] = subprocess.Popen([sys.executable, "-m", "pdserve.cli", stage], env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        assert wait_until_ready(url, 120), (tmp_path / "stages.log").read_text()[-2000:]
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4

        result: dict = {}

        def long_request():
            r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 4000}, timeout=120)
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(3)
        procs["worker"].kill()
        t.join(timeout=60)
        assert result["status"] == 500, result
        assert "worker" in result["body"]["error"]["message"]
        workers = httpx.get(f"{url}/workers").json()
        assert [w["state"] for w in workers] == ["dead"]
        assert httpx.get(f"{url}/ready").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["message"]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                pytest.fail(f"{name} did not exit on SIGTERM")
        log.close()


def test_one_dead_worker_of_two_is_not_fatal_and_restart_workers_brings_it_back(smollm2_dir, tmp_path):
    with running_server(smollm2_dir, tmp_path, "--workers", "2", "--restart-workers",
                        "--heartbeat-interval", "0.5", "--liveness-timeout", "3") as srv:
        def by_id():
            return {w["id"]: w for w in httpx.get(f"{srv.url}/workers").json()}

        deadline = time.monotonic() + 60  # /ready needs one worker; wait for both to register
        while time.monotonic() < deadline and not {"worker-0", "worker-1"} <= {
                i for i, w in by_id().items() if w["state"] == "ready"}:
            time.sleep(0.3)
        old_pid = by_id()["worker-0"]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text  # the other worker serves meanwhile
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            w = by_id().get("worker-0", {})
            if w.get("state") == "ready" and w.get("pid") != old_pid:
                break
            time.sleep(0.5)
        assert by_id()["worker-0"]["state"] == "ready" and by_id()["worker-0"]["pid"] != old_pid
        assert srv.proc.poll() is None
        assert "restarting it" in srv.log.read_text()
