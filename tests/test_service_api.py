"""The `openai` SDK and raw HTTP against a real `pdserve up`: every stage its own process.

One server for the module (2 tokenizers, 2 detokenizers, 1 worker), compared against the offline
engine on the same model for greedy outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from pdserve.offline_engine import OfflineEngine, make_request
from tests.reliability_client import metric
from tests.service_fixture import MODEL, module_server, stream_chats

pytestmark = pytest.mark.slow
server = module_server("srv", "--tokenizers", "2", "--detokenizers", "2", "--max-num-seqs", "48")


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    return OfflineEngine(ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=1024),
                         SchedulerSettings())


def offline_texts(offline, tokenizer, questions, max_tokens):
    reqs = [make_request(f"q{i}", tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                         SamplingParams(max_tokens=max_tokens, temperature=0.0), tokenizer.eos_token_ids)
            for i, q in enumerate(questions)]
    return [(tokenizer.decode(c.token_ids), len(c.token_ids)) for c in offline.generate(reqs)]


def test_health_ready_models_workers(server, client):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["missing"] == []
    assert health["stages"]["tokenizers"] == {"live": 2, "expected": 2}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    model = client.models.list().data[0]
    assert model.id == MODEL and model.root
    workers = httpx.get(f"{server.url}/workers").json()
    assert len(workers) == 1
    w = workers[0]
    assert w["role"] == "mixed" and w["state"] == "ready" and w["blocks_total"] > 0 and w["pid"] > 0


def test_chat_and_completions_stream_and_not(server, client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=20)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 20

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content

    # vLLM's continuous_usage_stats: every chunk carries the usage so far
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage.prompt_tokens == chat.usage.prompt_tokens for c in chunks)
    assert counts == sorted(counts) and counts[-1] == chat.usage.completion_tokens and counts[1] >= 1

    comp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8,
                                     temperature=0, n=2, logprobs=2)
    assert len(comp.choices) == 2 and comp.choices[0].text == comp.choices[1].text
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 16
    assert len(comp.choices[0].logprobs.tokens) == 8 and len(comp.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text


def test_32_simultaneous_streams_equal_offline_engine(server, offline, smollm2_tokenizer):
    questions = [f"Tell me one fact about the number {i}." for i in range(32)]
    expected = offline_texts(offline, smollm2_tokenizer, questions, 24)
    got = stream_chats(server.url, MODEL, [[{"role": "user", "content": q}] for q in questions], 24)
    assert got == expected


def test_stop_strings_never_leak_into_a_stream(server, client, offline, smollm2_tokenizer):
    q = "Write a short story about a cat who loves the sea."
    full, _ = offline_texts(offline, smollm2_tokenizer, [q], 40)[0]
    words = full.split()
    stop = " ".join(words[5:7])  # two words in the middle, spanning several tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=40,
        stop=[stop], stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(pieces)
    assert text == full[: full.index(stop)] and stop not in text and finish == "stop"
    included = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=40,
        stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert included.choices[0].message.content == full[: full.index(stop) + len(stop)]


def test_non_ascii_output_arrives_intact(server, client, offline, smollm2_tokenizer):
    questions = ["How do you say hello in Chinese?", "Write 'über' in German."]
    expected = offline_texts(offline, smollm2_tokenizer, questions, 40)
    for q, (text, _) in zip(questions, expected):
        assert any(ord(ch) > 127 for ch in text)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=40, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_abort_on_disconnect_frees_kv_blocks(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave mid-stream: the connection closes
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up
        httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (metric(server.url, "pdserve:kv_cache_usage_perc") == 0.0
                and metric(server.url, "pdserve:num_requests_running") == 0):
            break
        time.sleep(0.3)
    assert metric(server.url, "pdserve:kv_cache_usage_perc") == 0.0
    assert metric(server.url, "pdserve:num_requests_running") == 0.0


BAD = [
    ("malformed json", b"{not json", 400, None),
    ("wrong type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, 400, "max_tokens"),
    ("temperature out of range", {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ("over-long prompt", {"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("missing messages", {"model": MODEL}, 422, "messages"),
    ("oversize body", {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, name, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=data,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200  # still serving


def test_unknown_route_is_an_openai_404(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_metrics_are_exported(server, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_hit_rate", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total"):
        assert f"pdserve:{name}" in text, name
    assert metric(server.url, "pdserve:generation_tokens_total") >= 3
    assert 'finished_reason="length"' in text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_pdserve_bench_against_the_server(server, smollm2_dir, tmp_path, endpoint):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", server.url, "--endpoint", endpoint,
         "--dataset", "random", "--num-prompts", "6", "--random-input-len", "24",
         "--random-output-len", "8", "--ignore-eos", "--request-rate", "20", "--seed", "1",
         "--tokenizer", str(smollm2_dir), "--slo", "ttft=60000,tpot=60000",
         "--output-json", str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert all(r["output_len"] == 8 for r in result["requests"])
    assert summary["output_throughput"] > 0 and plot.stat().st_size > 1000


def test_tokenizer_and_detokenizer_processes_never_load_torch(server, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # they have done work
    stages = {}
    for pid in server.child_pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"pdserve.cli" in argv:
            stages.setdefault(argv[argv.index(b"pdserve.cli") + 3].decode(), []).append(pid)
    assert len(stages.get("tokenizer", [])) == 2 and len(stages.get("detokenizer", [])) == 2
    for pid in stages["tokenizer"] + stages["detokenizer"]:
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
    assert any("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in stages["worker"])
