"""Issue 13, the gateway's part, with real processes and real signals: a client that leaves while
its request is still queued frees its slot at once; a full door refuses before reading the body;
a scheduler that stalls or dies ends every open request with an error (an SSE error event and
[DONE], or a 5xx body), never a cut or a hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.reliability_client import LONG_CHAT, metric, stage_pids, start_stream, wait_for
from tests.service_fixture import start_server

pytestmark = pytest.mark.slow
LIVENESS = ("--heartbeat-interval", "0.5", "--liveness-timeout", "3")


def start_plain(url: str, body: dict, timeout: float = 60) -> tuple[dict, threading.Thread]:
    """A non-streamed chat request in a thread; its status and JSON body land in the dict."""
    plain: dict = {}

    def non_stream() -> None:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
        plain["status"], plain["body"] = r.status_code, r.json()

    waiter = threading.Thread(target=non_stream)
    waiter.start()
    return plain, waiter


def queue_state(srv) -> str:
    """What the stack is doing, for a failed wait's message: running and waiting counts, log tail."""
    counts = {name: metric(srv.url, f"pdserve:num_requests_{name}") for name in ("running", "waiting")}
    return f"{counts}; server log ends:\n{srv.log.read_text()[-2000:]}"


@pytest.fixture(scope="module")
def one_slot(smollm2_dir, tmp_path_factory):
    """One sequence at a time: a second request waits in the queue while the first runs."""
    srv = start_server(smollm2_dir, tmp_path_factory.mktemp("one-slot"), "--max-num-seqs", "1",
                       "--max-num-batched-tokens", "64", *LIVENESS)
    yield srv
    srv.stop()


def test_a_client_leaving_while_queued_frees_its_waiting_slot_at_once(one_slot):
    url = one_slot.url
    leave_running = threading.Event()
    running, running_thread = start_stream(url, LONG_CHAT, stop=leave_running)
    assert wait_for(lambda: len(running.tokens) > 2, 180), running
    for stream in (True, False):  # each waits behind the running one, then its client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={**LONG_CHAT, "stream": stream},
                       timeout=httpx.Timeout(1.5, connect=10))
        assert wait_for(lambda: metric(url, "pdserve:num_requests_waiting") == 0, 3), (
            f"stream={stream}: the abandoned request still waits")
        assert running_thread.is_alive() and running.finish_reason is None  # it was still queued
    leave_running.set()
    running_thread.join(30)
    assert wait_for(lambda: metric(url, "pdserve:kv_cache_usage_perc") == 0.0
                    and metric(url, "pdserve:num_requests_running") == 0, 10)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200  # the stack still serves


def test_a_full_door_refuses_before_reading_the_body(one_slot):
    """One running, one waiting: the stack-wide bound (one batch, 1) is reached, so a new
    request is refused at once, without its body being read; a body that is no JSON at all
    gets the 429 too, not the 400 that parsing it would give."""
    url = one_slot.url
    leave = threading.Event()
    running, running_thread = start_stream(url, LONG_CHAT, stop=leave)
    assert wait_for(lambda: len(running.tokens) > 2, 180), running
    queued, queued_thread = start_stream(url, LONG_CHAT, stop=leave)
    assert wait_for(lambda: metric(url, "pdserve:num_requests_waiting") == 1, 30), queue_state(one_slot)
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 429 and "bound is 1" in r.json()["error"]["message"], r.text
    assert int(r.headers["retry-after-ms"]) >= 1
    leave.set()  # both clients leave; their requests are aborted
    for t in (running_thread, queued_thread):
        t.join(60)
    assert wait_for(lambda: metric(url, "pdserve:kv_cache_usage_perc") == 0.0
                    and metric(url, "pdserve:num_requests_running") == 0
                    and metric(url, "pdserve:num_requests_waiting") == 0, 30)
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text  # with room at the door the body is read, and refused


def test_a_stalled_scheduler_ends_open_requests_with_errors_and_recovers(one_slot):
    url = one_slot.url
    streamed, thread = start_stream(url, LONG_CHAT)
    assert wait_for(lambda: len(streamed.tokens) > 2, 180), streamed
    plain, waiter = start_plain(url, LONG_CHAT)
    time.sleep(0.5)
    scheduler = stage_pids(one_slot.child_pids(), "scheduler")
    assert len(scheduler) == 1
    paused = time.monotonic()
    os.kill(scheduler[0], signal.SIGSTOP)
    try:
        thread.join(15)
        waiter.join(15)
        assert not thread.is_alive() and not waiter.is_alive(), "a request hangs"
        assert streamed.clean and streamed.errors and streamed.finish_reason is None, streamed
        assert "scheduler" in streamed.errors[0]["message"]
        assert streamed.ended_at - paused < 10
        assert plain["status"] == 503 and "scheduler" in plain["body"]["error"]["message"], plain
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 503  # not ready while the scheduler is silent
    finally:
        os.kill(scheduler[0], signal.SIGCONT)
    # Back: the workers register again, the aborts of the failed requests free their blocks.
    assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 30)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert wait_for(lambda: metric(url, "pdserve:kv_cache_usage_perc") == 0.0, 10)


def test_a_dead_scheduler_ends_every_open_request_in_words(smollm2_dir, tmp_path):
    srv = start_server(smollm2_dir, tmp_path, "--max-num-seqs", "1", "--max-num-batched-tokens", "64",
                       "--max-waiting-requests", "4", *LIVENESS)  # two wait behind the running one
    try:
        streamed, thread = start_stream(srv.url, LONG_CHAT)
        # The others only once it runs: clients started together reach the gateway in any order,
        # and the one slot goes to whichever came first (FCFS), maybe for all its 2000 tokens.
        assert wait_for(lambda: len(streamed.tokens) > 2, 180), (streamed, queue_state(srv))
        queued, queued_thread = start_stream(srv.url, LONG_CHAT)
        plain, waiter = start_plain(srv.url, LONG_CHAT)
        assert wait_for(lambda: metric(srv.url, "pdserve:num_requests_waiting") == 2, 30), (
            streamed, queued, plain, queue_state(srv))
        scheduler = stage_pids(srv.child_pids(), "scheduler")
        killed = time.monotonic()
        os.kill(scheduler[0], signal.SIGKILL)
        for t in (thread, queued_thread, waiter):
            t.join(15)
            assert not t.is_alive(), "a request hangs"
        for outcome in (streamed, queued):
            assert outcome.clean and outcome.errors, outcome  # an error event and [DONE], no cut
            assert outcome.ended_at - killed < 15
        assert not queued.tokens, queued  # it was still waiting
        assert plain["status"] >= 500 and plain["body"]["error"]["message"], plain
        assert srv.proc.wait(timeout=30) == 1  # the scheduler is fatal: the launcher stops
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "ZMQError" not in log and "never retrieved" not in log, log[-3000:]
