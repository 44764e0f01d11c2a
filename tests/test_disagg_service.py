"""Disaggregated prefill/decode through the real stack: processes, sockets, KV transfers over zmq.

One `pdserve up` with 1 prefill + 2 decode workers (every prompt split: --max-local-prefill-tokens
0), KV accounting checked every half second (--check-integrity-interval). The tests run in file
order and the later ones are destructive: a stopped destination, a hand-started worker that joins
and drains, then kill -9 of a decode worker and of the prefill worker under load. After each, every
request either equals the offline engine's greedy output token for token (so no token was lost or
repeated across a transfer or a migration) or ended with a clear error; KV usage returns to 0 and
no integrity check failed. test_service_api.py shows the colocated stack equals the same offline
engine, so equality here is equality with the colocated stack too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.offline_engine import OfflineEngine, make_request
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from tests.service_fixture import start_server, stream_chats

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
SYSTEM = ("You are a meticulous assistant for a shipping company. You answer questions about parcels, "
          "delivery times, customs forms and tracking numbers. Always answer in one short sentence, "
          "never invent tracking numbers, and say so when you do not know something. ") * 3


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    srv = start_server(smollm2_dir, tmp_path_factory.mktemp("disagg"), "--served-model-name", MODEL,
                       "--prefill-workers", "1", "--decode-workers", "2", "--max-local-prefill-tokens", "0",
                       "--check-integrity-interval", "0.5", "--kv-transfer-timeout", "2",
                       "--heartbeat-interval", "0.5", "--liveness-timeout", "4", "--drain-timeout", "30",
                       "--max-num-seqs", "32")
    # /ready needs one model worker: wait until all three have registered.
    wait_for(lambda: {"prefill-0", "decode-0", "decode-1"} <= {
        i for i, w in workers(srv).items() if w["state"] == "ready"}, 120, "every worker to register")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    return OfflineEngine(ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=1024),
                         SchedulerSettings())


def messages(q: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]


def workers(server) -> dict[str, dict]:
    return {w["id"]: w for w in httpx.get(f"{server.url}/workers").json()}


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}{{([^}}]*)}} ([0-9.e+-]+)$", text, re.M):
        if all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_settled(server) -> None:
    """KV usage back to 0 on every live worker and no accounting check failed."""
    wait_for(lambda: all(w["blocks_used"] == 0 and w["running_requests"] == 0
                         for w in workers(server).values() if w["state"] == "ready"), 20, "KV usage 0")
    assert metric(server, "pdserve:kv_integrity_checks_total") > 0
    assert metric(server, "pdserve:kv_integrity_failures_total") == 0


async def stream(server, prompt: list[dict] | str, max_tokens: int) -> tuple[str, int, str | None, str]:
    """One streamed greedy request (chat for a message list, completion for a string): its text,
    completion tokens, finish reason and error message (empty when none)."""
    chat = isinstance(prompt, list)
    body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, ("messages" if chat else "prompt"): prompt}
    text, n, finish, error = [], 0, None, ""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{server.url}{path}", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    continue
                for choice in chunk.get("choices") or []:
                    text.append((choice["delta"].get("content") if chat else choice["text"]) or "")
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    return "".join(text), n, finish, error


def run_streams(server, prompts, max_tokens):
    async def all_():
        return await asyncio.gather(*(stream(server, p, max_tokens) for p in prompts))
    return asyncio.run(all_())


def expected_texts(offline, tokenizer, prompts, max_tokens) -> list[tuple[str, int]]:
    """The offline engine's greedy (text, token count) for chat message lists or plain prompts."""
    reqs = [make_request(f"q{i}", tokenizer.apply_chat_template(p) if isinstance(p, list) else tokenizer.encode(p),
                         SamplingParams(max_tokens=max_tokens, temperature=0.0), tokenizer.eos_token_ids)
            for i, p in enumerate(prompts)]
    return [(tokenizer.decode(c.token_ids), len(c.token_ids)) for c in offline.generate(reqs)]


def done(results) -> list[tuple[str, int]]:
    return [(text, n) for text, n, _, _ in results]


def test_concurrent_streams_through_prefill_and_two_decode_workers_equal_offline(server, offline, smollm2_tokenizer):
    convs = [messages(f"Tell me one fact about the number {i}.") for i in range(12)]
    expected = expected_texts(offline, smollm2_tokenizer, convs, 24)
    got = stream_chats(server.url, MODEL, convs, 24)
    assert got == expected
    w = workers(server)
    assert w["prefill-0"]["role"] == "prefill" and w["prefill-0"]["transfers_done"] == 0
    assert sum(w[d]["transfers_done"] for d in ("decode-0", "decode-1")) == 12
    assert sum(w[d]["transfers_by_transport"].get("zmq", 0) for d in ("decode-0", "decode-1")) == 12
    assert all(w[d]["transfers_done"] > 0 for d in ("decode-0", "decode-1"))  # both decode workers used
    assert metric(server, "pdserve:kv_transfers_total", outcome="ok", transport="zmq") == 12
    wait_for(lambda: metric(server, "pdserve:request_kv_transfer_time_seconds_count") == 12, 5,
             "12 phase records (published with the stats, twice a second)")
    assert_settled(server)


def test_a_shared_system_prompt_crosses_the_wire_once(server, offline, smollm2_tokenizer):
    before = workers(server)
    bytes0 = metric(server, "pdserve:kv_transfer_bytes_total")
    first = run_streams(server, [messages("Where is my parcel?", SYSTEM)], 8)[0]
    time.sleep(1.2)  # transfer records reach /metrics with the scheduler's stats, twice a second
    bytes1 = metric(server, "pdserve:kv_transfer_bytes_total")
    second = run_streams(server, [messages("How long does customs take?", SYSTEM)], 8)[0]
    time.sleep(1.2)
    bytes2 = metric(server, "pdserve:kv_transfer_bytes_total")
    assert bytes1 - bytes0 > 0 and bytes2 - bytes1 < (bytes1 - bytes0) / 4  # only the tail moved
    after = workers(server)
    moved = [d for d in ("decode-0", "decode-1") if after[d]["transfers_done"] > before[d]["transfers_done"]]
    assert len(moved) == 1  # both went to the decode worker that caches the system prompt
    expected = expected_texts(offline, smollm2_tokenizer,
                              [messages("Where is my parcel?", SYSTEM), messages("How long does customs take?", SYSTEM)], 8)
    assert done([first, second]) == expected
    assert_settled(server)


def test_a_transfer_to_a_stopped_destination_times_out_and_releases_both_sides(server, offline, smollm2_tokenizer):
    w = workers(server)
    victim = w["decode-1"]
    failed0 = metric(server, "pdserve:kv_transfers_total", outcome="failed")
    migrations0 = metric(server, "pdserve:request_migrations_total")
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        # Plain prompts without a shared prefix: the decode workers look alike but for their load,
        # so the stopped one (idle to the scheduler's eyes) gets some of the transfers.
        convs = [f"Item {i}: a list of three colors and three fruits:" for i in range(6)]
        got = run_streams(server, convs, 12)
        wait_for(lambda: metric(server, "pdserve:kv_transfers_total", outcome="failed") > failed0, 10,
                 "a failed transfer")
        stopped = workers(server)["decode-1"]
        assert stopped["blocks_used"] == 0 and stopped["transfers_in"] == 0  # its reservation released
        assert workers(server)["prefill-0"]["blocks_used"] == 0  # and the source's
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    assert metric(server, "pdserve:request_migrations_total") > migrations0
    assert done(got) == expected_texts(offline, smollm2_tokenizer, convs, 12)
    wait_for(lambda: workers(server).get("decode-1", {}).get("state") == "ready", 15, "decode-1 back")
    assert_settled(server)


def test_a_decode_worker_started_by_hand_joins_gets_work_and_drains_on_sigterm(
        server, offline, smollm2_tokenizer, smollm2_dir, tmp_path):
    env = {**os.environ, "PDSERVE_RUN_DIR": str(server.run_dir), "PYTHONUNBUFFERED": "1",
           "PDSERVE_HEARTBEAT_INTERVAL": "0.5", "PDSERVE_LIVENESS_TIMEOUT": "4", "PDSERVE_TORCH_THREADS": "1"}
    log = tmp_path / "extra.log"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "worker", "--role", "decode",
                             "--stage-id", "decode-extra", "--model", str(smollm2_dir)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: workers(server).get("decode-extra", {}).get("state") == "ready", 120, "the new worker")
        # Plain prompts without a shared prefix: decode work spreads by load, so the new (idle)
        # worker gets its share.
        convs = [f"Words that rhyme with {w}, a list:" for w in ("cat", "dog", "sun", "tree", "car", "hat")]
        expected = expected_texts(offline, smollm2_tokenizer, convs, 40)

        async def load_and_drain():
            tasks = [asyncio.create_task(stream(server, c, 40)) for c in convs]
            await asyncio.to_thread(wait_for, lambda: workers(server)["decode-extra"]["running_requests"] > 0,
                                    60, "requests on the new worker")
            proc.send_signal(signal.SIGTERM)  # drain under load
            return await asyncio.gather(*tasks)

        got = asyncio.run(load_and_drain())
        assert done(got) == expected  # every request completed, none cut
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        wait_for(lambda: workers(server)["decode-extra"]["state"] == "drained", 5, "the drained state")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_settled(server)


def test_a_worker_that_does_not_fit_the_stack_is_refused_and_exits(server, smollm2_dir):
    env = {**os.environ, "PDSERVE_RUN_DIR": str(server.run_dir), "PDSERVE_TORCH_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "worker", "--role", "decode", "--stage-id",
                           "misfit", "--model", str(smollm2_dir), "--block-size", "32"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "refused" in done.stderr and "block size is 32, the stack's 16" in done.stderr
    assert "misfit" not in workers(server)


def _kill_under_load(server, offline, smollm2_tokenizer, convs, max_tokens, victim_of):
    expected = expected_texts(offline, smollm2_tokenizer, convs, max_tokens)

    async def load_and_kill():
        tasks = [asyncio.create_task(stream(server, c, max_tokens)) for c in convs]
        victim = await asyncio.to_thread(victim_of)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        results = await asyncio.gather(*tasks)
        return results, time.monotonic() - killed_at

    results, _ = asyncio.run(load_and_kill())
    completed = 0
    for (text, n, finish, error), exp in zip(results, expected):
        if error:
            assert "worker" in error  # a clear error, never a silent cut
        else:
            assert (text, n) == exp  # no gap, no repeat
            completed += 1
    return completed


def test_kill_9_of_a_decode_worker_under_load_loses_no_request(server, offline, smollm2_tokenizer):
    convs = [messages(f"Write two sentences about the city number {i}.") for i in range(8)]

    def victim():
        def busy():
            w = workers(server)
            return any(w[d]["running_requests"] > 0 for d in ("decode-0", "decode-1") if d in w)
        wait_for(busy, 60, "decode work")
        w = workers(server)
        return max((w[d] for d in ("decode-0", "decode-1") if d in w), key=lambda x: x["running_requests"])["pid"]

    assert _kill_under_load(server, offline, smollm2_tokenizer, convs, 48, victim) == len(convs)
    assert metric(server, "pdserve:request_migrations_total") > 0
    assert_settled(server)


def test_kill_9_of_the_prefill_worker_mid_prefill_loses_no_request(server, offline, smollm2_tokenizer):
    long_q = "Summarize this in one line: " + "The committee met again and discussed the budget. " * 40
    convs = [messages(long_q + f" ({i})") for i in range(6)]

    def victim():
        wait_for(lambda: workers(server)["prefill-0"]["running_requests"] > 0, 60, "prefill work")
        return workers(server)["prefill-0"]["pid"]

    assert _kill_under_load(server, offline, smollm2_tokenizer, convs, 8, victim) == len(convs)
    w = workers(server)
    assert w["prefill-0"]["state"] == "dead"
    assert_settled(server)
