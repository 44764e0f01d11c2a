"""Issue 13's acceptance, with real processes and real signals: 2 tokenizers, 2 detokenizers and
2 workers (--restart-workers) under streaming load; kill -9 of a tokenizer, a detokenizer and a
worker, and a tokenizer and a detokenizer paused past the liveness timeout (SIGSTOP, SIGCONT).
After each: the stack keeps serving; every request in flight finished with exactly the tokens of
an undisturbed run, or ended with an error event, within the deadline; the stage is back (the
launcher respawns a dead one, a paused one rejoins); at the end no KV block is held and every
integrity check passed."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.reliability_client import StreamLoad, StreamOutcome, metric, read_stream, stage_pids, wait_for
from tests.service_fixture import start_server

pytestmark = pytest.mark.slow
DEADLINE = 30.0  # seconds from a fault to the end of every request in flight (15 s on a quiet machine)
BODY = {"messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 12,
        "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
EVENTS = [("tokenizer", signal.SIGKILL), ("detokenizer", signal.SIGKILL), ("worker", signal.SIGKILL),
          ("detokenizer", signal.SIGSTOP), ("tokenizer", signal.SIGSTOP)]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def test_each_single_stage_fault_leaves_the_stack_serving(smollm2_dir, tmp_path):
    srv = start_server(smollm2_dir, tmp_path, "--tokenizers", "2", "--detokenizers", "2",
                       "--workers", "2", "--restart-workers", "--heartbeat-interval", "0.5",
                       "--liveness-timeout", "3", "--check-integrity-interval", "1")
    try:
        url = srv.url
        assert wait_for(lambda: health(url)["status"] == "ok", 120), health(url)
        reference = StreamOutcome()
        read_stream(url, BODY, reference)
        assert reference.clean and reference.completion_tokens == 12, reference
        load = StreamLoad(url, BODY, concurrency=4).start()
        try:
            for stage, sig in EVENTS:
                done_before = sum(1 for o in load.outcomes if o.finish_reason)
                assert wait_for(lambda: sum(1 for o in load.outcomes if o.finish_reason) >= done_before + 2, 120)
                pid = stage_pids(srv.child_pids(), stage)[0]
                moment = time.monotonic()
                os.kill(pid, sig)
                if sig == signal.SIGSTOP:
                    time.sleep(5)  # past the liveness timeout: declared gone, then it comes back
                    os.kill(pid, signal.SIGCONT)
                affected = load.in_flight_at(moment)
                assert wait_for(lambda: all(o.ended_at is not None for o in affected), DEADLINE + 5), (
                    f"{stage} {sig.name}: a request hangs")
                late = [o.ended_at - moment for o in affected if o.ended_at - moment > DEADLINE]
                assert not late, f"{stage} {sig.name}: requests ended {late} s after the fault"
                errors = sum(1 for o in affected if o.errors)
                print(f"{stage} {sig.name}: {len(affected)} in flight, {errors} ended with an error, "
                      f"last ended {max((o.ended_at - moment for o in affected), default=0):.1f} s after")
                assert wait_for(lambda: health(url)["status"] == "ok", 120), (stage, sig.name, health(url))
                assert srv.proc.poll() is None
        finally:
            load.stop()
        bad = [o for o in load.outcomes if not o.clean]
        assert not bad, bad[:3]
        finished = [o for o in load.outcomes if o.finish_reason]
        assert len(finished) >= 2 * len(EVENTS)
        for o in finished:  # no token lost or repeated, migrations included
            assert o.completion_tokens == 12 and o.text == reference.text, o
        assert wait_for(lambda: metric(url, "pdserve:kv_cache_usage_perc") == 0.0, 15)
        assert metric(url, "pdserve:kv_integrity_failures_total") == 0
        assert metric(url, "pdserve:kv_integrity_checks_total") > 0
        log = srv.log.read_text()
        assert srv.stop() == 0
        assert "tokenizer-0 exited" in log or "tokenizer-1 exited" in log
        assert log.count("restarting it") >= 3  # a tokenizer, a detokenizer, a worker
    finally:
        if srv.proc.poll() is None:  # a failed assertion above: do not leave the stack running
            srv.stop()
