"""`pdserve bench`: the pure parts (SSE parsing, stream timing, metrics, schedule, datasets).

No server here: the end-to-end run against a real `pdserve up` lives with the serving tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
from pathlib import Path

import httpx
import pytest

from pdserve.bench import report
from pdserve.bench.client import (RequestRecord, SSEParser, StreamError, StreamTracker,
                                  build_payload)
from pdserve.bench.command import is_local_url
from pdserve.bench.datasets import (WORDS, BenchRequest, ShareGPTLimits, estimated_tokens,
                                    length_range, random_requests, shared_prefix_requests,
                                    sharegpt_requests)
from pdserve.bench.runner import poisson_arrival_times, run_schedule
from pdserve.cli import build_parser, main

# ---------------------------------------------------------------- SSE parsing

SSE_BYTES = (
    b": keep-alive comment\n\n"
    b'data: {"a": 1}\n\n'
    b'data: {"text": "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac"}\r\n\r\n'
    b"event: message\ndata: line one\ndata: line two\n\n"
    b"id: 7\r\ndata:no-space\r\r"
    b"data: [DONE]\n\n"
)
SSE_EVENTS = ['{"a": 1}', '{"text": "café 日本"}', "line one\nline two", "no-space", "[DONE]"]


def _feed_all(chunks: list[bytes]) -> list[str]:
    parser = SSEParser()
    events = [e for c in chunks for e in parser.feed(c)]
    return events + parser.close()


def test_sse_whole_stream():
    assert _feed_all([SSE_BYTES]) == SSE_EVENTS


def test_sse_every_two_way_split_and_byte_by_byte():
    for cut in range(len(SSE_BYTES) + 1):
        assert _feed_all([SSE_BYTES[:cut], SSE_BYTES[cut:]]) == SSE_EVENTS, cut
    assert _feed_all([SSE_BYTES[i:i + 1] for i in range(len(SSE_BYTES))]) == SSE_EVENTS


def test_sse_random_splits():
    rng = random.Random(3)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(SSE_BYTES)), rng.randint(1, 12)))
        bounds = [0, *cuts, len(SSE_BYTES)]
        assert _feed_all([SSE_BYTES[a:b] for a, b in zip(bounds, bounds[1:])]) == SSE_EVENTS


def test_sse_unterminated_last_event_is_flushed_on_close():
    parser = SSEParser()
    assert parser.feed(b'data: {"x": 2}') == []
    assert parser.close() == ['{"x": 2}']
    assert SSEParser().close() == []


# ---------------------------------------------------------------- stream timing

def _chat(content: str | None, role: bool = False, finish: str | None = None) -> dict:
    delta = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_tracker_chat_stream_with_role_chunk_and_usage():
    tracker = StreamTracker(RequestRecord(index=3, prompt_len=99, start_time=10.0))
    tracker.on_chunk(_chat("", role=True), 10.5)
    tracker.on_chunk(_chat("Hi"), 10.625)
    tracker.on_chunk(_chat(" there"), 10.75)
    tracker.on_chunk(_chat("", finish="length"), 10.875)
    tracker.on_chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}, 10.875)
    rec = tracker.finish(11.0)
    assert rec.success and rec.error == ""
    assert (rec.prompt_len, rec.output_len, rec.usage_reported) == (7, 3, True)
    assert rec.ttft == 0.5 and rec.itl == [0.125, 0.125] and rec.e2e == 1.0
    assert rec.tpot == 0.25  # (1.0 - 0.5) / (3 - 1)


def test_tracker_completions_without_usage_counts_text_chunks():
    tracker = StreamTracker(RequestRecord(index=0, prompt_len=5, start_time=0.0))
    for t, text in ((0.25, "a"), (0.5, "b"), (0.5, "c"), (1.0, "d")):
        tracker.on_chunk({"choices": [{"index": 0, "text": text}]}, t)
    rec = tracker.finish(1.25)
    assert (rec.success, rec.prompt_len, rec.output_len, rec.usage_reported) == (True, 5, 4, False)
    assert rec.ttft == 0.25 and rec.itl == [0.25, 0.0, 0.5] and rec.e2e == 1.25
    assert rec.tpot == pytest.approx(1.0 / 3)


def test_tracker_one_token_has_no_tpot_and_empty_stream_fails():
    tracker = StreamTracker(RequestRecord(index=0, start_time=0.0))
    tracker.on_chunk({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}, 0.5)
    rec = tracker.finish(0.5)
    assert rec.success and rec.itl == [] and rec.tpot is None
    empty = StreamTracker(RequestRecord(index=1, start_time=0.0))
    empty.on_chunk({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 0}}, 0.1)
    rec = empty.finish(0.2)
    assert not rec.success and rec.error == "the stream ended without any choices"


def test_tracker_error_chunk_raises():
    tracker = StreamTracker(RequestRecord(index=0))
    with pytest.raises(StreamError, match="context too long"):
        tracker.on_chunk({"error": {"message": "context too long", "code": 400}}, 0.1)
    with pytest.raises(StreamError):
        tracker.on_chunk([1, 2], 0.1)


def test_build_payload():
    req = BenchRequest("hello there", 2, 16)
    assert build_payload("chat", "m", req, ignore_eos=True) == {
        "model": "m", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello there"}], "ignore_eos": True}
    assert build_payload("completions", "m", req, ignore_eos=False, temperature=0.0) == {
        "model": "m", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "prompt": "hello there", "temperature": 0.0}
    with pytest.raises(ValueError):
        build_payload("embeddings", "m", req, ignore_eos=False)


# ---------------------------------------------------------------- metrics

def _rec(index: int, ttft: float, e2e: float, out: int, itl: list[float], start: float,
         prompt: int = 10) -> RequestRecord:
    return RequestRecord(index=index, success=True, prompt_len=prompt, output_len=out, ttft=ttft,
                         itl=itl, e2e=e2e, start_time=start, usage_reported=True)


RECORDS = [
    _rec(0, 0.1, 1.1, 11, [0.1] * 10, 100.0),   # tpot 0.1
    _rec(1, 0.2, 0.7, 6, [0.1] * 5, 100.5),     # tpot 0.1
    _rec(2, 0.3, 2.3, 21, [0.1] * 20, 101.0),   # tpot 0.1
    _rec(3, 0.8, 0.8, 1, [], 101.5),            # one token: no tpot
    RequestRecord(index=4, error="HTTP 500: boom", prompt_len=10, start_time=102.0, e2e=0.05),
]


def test_summarize_counts_throughput_and_percentiles():
    s = report.summarize(RECORDS, duration=4.0, slo={})
    assert (s["completed"], s["failed"], s["not_sent"]) == (4, 1, 0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (40, 39)
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 9.75
    assert s["total_token_throughput"] == 19.75
    ttft = s["ttft_ms"]
    assert ttft["mean"] == pytest.approx(350.0)
    assert ttft["p50"] == pytest.approx(250.0)   # linear between 200 and 300
    assert ttft["p90"] == pytest.approx(650.0)   # 300 + 0.7 * 500
    assert ttft["p99"] == pytest.approx(785.0)   # 300 + 0.97 * 500
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["tpot_ms"]["std"] == pytest.approx(0.0)
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(950.0)
    assert "goodput" not in s


def test_goodput_with_slos():
    s = report.summarize(RECORDS, duration=4.0, slo={"ttft": 250.0, "tpot": 150.0})
    assert s["slo_ms"] == {"ttft": 250.0, "tpot": 150.0}
    assert s["goodput"] == 0.5 and s["goodput_fraction"] == 0.4  # requests 0 and 1 of 5
    s = report.summarize(RECORDS, duration=4.0, slo={"ttft": 1000.0, "tpot": 50.0})
    assert s["goodput"] == 0.25 and s["goodput_fraction"] == 0.2  # only the one-token request
    s = report.summarize(RECORDS, duration=4.0, slo={"e2e": 1000.0})
    assert s["goodput"] == 0.5  # the 0.7 s and 0.8 s requests
    s = report.summarize(RECORDS, duration=4.0, slo={"e2e": 2400.0})
    assert s["goodput"] == 1.0 and s["goodput_fraction"] == 0.8  # all but the failed one


def test_summarize_with_no_success_has_no_distributions():
    s = report.summarize(RECORDS[4:], duration=1.0, slo={"ttft": 1.0})
    assert s["completed"] == 0 and s["ttft_ms"] == {"mean": None, "std": None, "p50": None,
                                                    "p90": None, "p99": None}
    assert s["goodput"] == 0.0 and s["goodput_fraction"] == 0.0
    assert "n/a" in report.format_table(s)


def test_parse_slo():
    assert report.parse_slo("ttft=500, TPOT=50") == {"ttft": 500.0, "tpot": 50.0}
    assert report.parse_slo(None) == {} and report.parse_slo("") == {}
    for bad in ("ttft", "itl=5", "ttft=abc", "tpot=0"):
        with pytest.raises(ValueError):
            report.parse_slo(bad)


def test_table_json_and_plot(tmp_path: Path):
    s = report.summarize(RECORDS, duration=4.0, slo={"ttft": 250.0})
    table = report.format_table(s)
    assert "Successful requests" in table and "P99 TTFT (ms)" in table and "785.00" in table
    assert "Goodput (req/s) [ttft<=250ms]" in table
    out = tmp_path / "sub" / "r.json"
    report.write_json(out, {"model": "m", "request_rate": "inf"}, s, RECORDS, bench_start=100.0)
    doc = json.loads(out.read_text())
    assert doc["config"] == {"model": "m", "request_rate": "inf"}
    assert doc["summary"]["completed"] == 4
    assert [r["start_time"] for r in doc["requests"]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert doc["requests"][0]["tpot"] == pytest.approx(0.1) and doc["requests"][3]["tpot"] is None
    assert doc["requests"][4]["error"] == "HTTP 500: boom"
    png = tmp_path / "plot.png"
    report.plot(png, RECORDS, bench_start=100.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- schedule

def test_poisson_schedule_is_seeded():
    a = poisson_arrival_times(50, 4.0, seed=7)
    assert a == poisson_arrival_times(50, 4.0, seed=7)
    assert a != poisson_arrival_times(50, 4.0, seed=8)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = poisson_arrival_times(20001, 4.0, seed=1)
    assert gaps[-1] / 20000 == pytest.approx(0.25, rel=0.03)  # mean gap 1/rate
    assert poisson_arrival_times(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            poisson_arrival_times(3, bad, seed=0)


def _requests(n: int) -> list[BenchRequest]:
    return [BenchRequest(f"p{i}", 3, 4) for i in range(n)]


def test_run_schedule_caps_concurrency_and_keeps_order():
    in_flight, peak = 0, 0

    async def send(index: int, request: BenchRequest) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01 * (5 - index % 5))
        in_flight -= 1
        return _rec(index, 0.01, 0.02, 2, [0.01], 0.0)

    result = asyncio.run(run_schedule(_requests(10), send, [0.0] * 10, max_concurrency=3))
    assert peak == 3
    assert [r.index for r in result.records] == list(range(10))
    assert result.not_sent == 0 and not result.stopped_by_time_limit


def test_run_schedule_follows_arrival_times():
    sent_at: dict[int, float] = {}
    loop_start: list[float] = []

    async def send(index: int, request: BenchRequest) -> RequestRecord:
        sent_at[index] = asyncio.get_running_loop().time() - loop_start[0]
        return _rec(index, 0.0, 0.0, 1, [], 0.0)

    async def main_() -> None:
        loop_start.append(asyncio.get_running_loop().time())
        await run_schedule(_requests(3), send, [0.0, 0.1, 0.2])

    asyncio.run(main_())
    assert sent_at[0] < 0.05 and 0.1 <= sent_at[1] < 0.18 and 0.2 <= sent_at[2] < 0.28


def test_run_schedule_time_limit_cancels_and_counts_unsent():
    async def send(index: int, request: BenchRequest) -> RequestRecord:
        await asyncio.sleep(0.0 if index == 0 else 10.0)
        return _rec(index, 0.0, 0.0, 1, [], 0.0)

    result = asyncio.run(run_schedule(_requests(4), send, [0.0, 0.0, 0.0, 5.0], max_duration=0.2))
    assert result.duration < 1.0 and result.stopped_by_time_limit
    assert [(r.index, r.success) for r in result.records] == [(0, True), (1, False), (2, False)]
    assert result.records[1].error == "cancelled at the run time limit"
    assert result.not_sent == 1


def test_run_schedule_turns_sender_exceptions_into_failures():
    async def send(index: int, request: BenchRequest) -> RequestRecord:
        raise RuntimeError("bug")

    result = asyncio.run(run_schedule(_requests(2), send, [0.0, 0.0]))
    assert [r.error for r in result.records] == ["RuntimeError: bug"] * 2


# ---------------------------------------------------------------- datasets

def test_random_requests_in_words():
    reqs = random_requests(40, 20, 8, 0.5, seed=5)
    assert reqs == random_requests(40, 20, 8, 0.5, seed=5)
    assert reqs != random_requests(40, 20, 8, 0.5, seed=6)
    assert length_range(20, 0.5) == (10, 30) and length_range(8, 0.5) == (4, 12)
    for r in reqs:
        words = r.prompt.split(" ")
        assert len(words) == r.prompt_len and set(words) <= set(WORDS)
        assert 10 <= r.prompt_len <= 30 and 4 <= r.max_tokens <= 12
    assert len({r.prompt_len for r in reqs}) > 5
    fixed = random_requests(3, 7, 5, 0.0, seed=0)
    assert [(r.prompt_len, r.max_tokens) for r in fixed] == [(7, 5)] * 3
    with pytest.raises(ValueError):
        length_range(10, 1.0)


def test_shared_prefix_requests_share_few_long_prefixes_in_words():
    reqs = shared_prefix_requests(12, 3, 50, 10, 6, 0.0, seed=4)
    assert reqs == shared_prefix_requests(12, 3, 50, 10, 6, 0.0, seed=4)
    heads = [" ".join(r.prompt.split(" ")[:50]) for r in reqs]
    assert len(set(heads)) == 3 and all(heads.count(h) == 4 for h in set(heads))  # each used 4 times
    tails = [" ".join(r.prompt.split(" ")[50:]) for r in reqs]
    assert len(set(tails)) == 12  # every request has its own question
    assert [(r.prompt_len, r.max_tokens) for r in reqs] == [(60, 6)] * 12
    assert all(len(r.prompt.split(" ")) == 60 for r in reqs)
    with pytest.raises(ValueError):
        shared_prefix_requests(4, 0, 50, 10, 6, 0.0, seed=4)


def _conv(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def _words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def test_sharegpt_parsing_and_filtering(tmp_path: Path):
    entries = [
        _conv(("human", _words(10, "a")), ("gpt", _words(20))),             # 13 / 26: kept
        _conv(("gpt", "hello"), ("human", _words(5, "b")), ("gpt", _words(5))),  # first human turn: 7 / 7
        _conv(("human", "hi"), ("gpt", _words(50))),                        # prompt 1 token: dropped
        _conv(("human", _words(10, "c")), ("gpt", "ok")),                   # reply 1 token: dropped
        _conv(("human", _words(800, "d")), ("gpt", _words(10))),            # prompt 1040 > 1024
        _conv(("human", _words(700, "e")), ("gpt", _words(900))),           # total 910 + 1170 > 2048
        _conv(("human", _words(10, "f"))),                                  # no reply
        _conv(("human", _words(10, "g")), ("human", _words(10))),           # reply not from gpt
        {"no": "conversations"},
        _conv(("user", _words(3, "h")), ("assistant", _words(4))),          # 4 / 5: kept (role aliases)
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    reqs = sharegpt_requests(path, 100, seed=0)
    got = sorted((r.prompt.split()[0], r.prompt_len, r.max_tokens) for r in reqs)
    assert got == [("a", 13, 26), ("b", 7, 7), ("h", 4, 5)]
    assert reqs == sharegpt_requests(path, 100, seed=0)
    two = sharegpt_requests(path, 2, seed=1)
    assert len(two) == 2 and {r.prompt for r in two} <= {r.prompt for r in reqs}
    fixed = sharegpt_requests(path, 100, seed=0, output_len=9)
    assert sorted(r.max_tokens for r in fixed) == [9, 9, 9]
    strict = sharegpt_requests(path, 100, seed=0, limits=ShareGPTLimits(min_len=6))
    assert sorted(r.prompt_len for r in strict) == [7, 13]
    assert estimated_tokens("one two three four five") == 7  # 6.5 rounds half up


def test_sharegpt_rejects_a_non_list(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(path, 1, seed=0)


@pytest.mark.slow
def test_random_and_sharegpt_with_smollm2_tokenizer(smollm2_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    reqs = random_requests(30, 64, 16, 0.5, seed=2, tokenizer=tok)
    for r in reqs:
        assert len(tok.encode(r.prompt, add_special_tokens=True)) == r.prompt_len
        assert 32 <= r.prompt_len <= 96 and 8 <= r.max_tokens <= 24
    assert [len(tok.encode(r.prompt)) for r in random_requests(3, 5, 4, 0.0, 1, tok)] == [5, 5, 5]
    prompt, reply = "Tell me a story about a dragon.", "Once upon a time there was a dragon."
    path = tmp_path / "s.json"
    path.write_text(json.dumps([_conv(("human", prompt), ("gpt", reply))]))
    (r,) = sharegpt_requests(path, 1, seed=0, tokenizer=tok)
    assert r.prompt_len == len(tok.encode(prompt)) and r.max_tokens == len(tok.encode(reply, add_special_tokens=False))
    shared = shared_prefix_requests(8, 2, 64, 16, 4, 0.0, seed=3, tokenizer=tok)
    ids = [tok.encode(r.prompt, add_special_tokens=True) for r in shared]
    assert [len(i) for i in ids] == [r.prompt_len for r in shared]
    assert len({tuple(i[:64]) for i in ids}) == 2  # token-level sharing: what prefix caching sees


# ---------------------------------------------------------------- command line

def test_cli_parses_defaults_and_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]):
    args = build_parser().parse_args(["bench"])
    assert (args.base_url, args.endpoint, args.dataset, args.request_rate) == (
        "http://127.0.0.1:8000", "chat", "random", math.inf)
    assert main(["bench", "--slo", "itl=5"]) == 2
    assert main(["bench", "--dataset", "sharegpt"]) == 2
    assert "--dataset-path" in capsys.readouterr().err
    assert is_local_url("http://127.0.0.1:8000") and is_local_url("http://localhost:1")
    assert is_local_url("http://[::1]:8000") and not is_local_url("http://example.com")


def test_cli_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"]) == 2
    assert "cannot use" in capsys.readouterr().err


def test_server_phase_breakdown_from_two_scrapes_of_gateway_metrics():
    from gateway.metrics import GatewayMetrics
    from pdserve.bench import server_phases
    from protocol.messages import RequestPhases, SchedulerStats, TransferRecord

    metrics = GatewayMetrics("m")

    async def scrape() -> dict[str, float] | None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=metrics.render()))
        async with httpx.AsyncClient(transport=transport) as client:
            return await server_phases.scrape(client, "http://server")

    def stats(phases, transfers) -> SchedulerStats:
        return SchedulerStats(0.0, "m", 100, 0, 0, 0.0, 0, 0, transfers=transfers, phases=phases)

    metrics.queue.observe(0.5)  # before the run: not counted
    metrics.observe_stats(stats([RequestPhases(0.5, 1.0, 0.0, 2.0)], []))
    before = asyncio.run(scrape())
    for q in (0.010, 0.030):
        metrics.queue.observe(q)
    metrics.observe_stats(stats([RequestPhases(0.01, 0.100, 0.004, 0.5, disaggregated=True),
                                 RequestPhases(0.03, 0.300, 0.0, 1.5)],
                                [TransferRecord("zmq", 3 * 2**20, 0.004, True),
                                 TransferRecord("zmq", 0, 1.0, False)]))
    got = server_phases.breakdown(before, asyncio.run(scrape()))
    assert got == {
        "queue_mean_ms": pytest.approx(20.0), "queue_requests": 2,
        "prefill_mean_ms": pytest.approx(200.0), "prefill_requests": 2,
        "kv_transfer_mean_ms": pytest.approx(4.0), "kv_transfer_requests": 1,
        "decode_mean_ms": pytest.approx(1000.0), "decode_requests": 2,
        "kv_transfers": 1, "kv_transfer_mib": pytest.approx(3.0),
    }
    rows = dict(server_phases.format_rows(got))
    assert rows["Server mean prefill time (ms)"] == "200.00" and rows["KV transfers"] == "1"
    assert server_phases.breakdown(None, got) is None


def test_worker_use_from_two_scrapes_of_workers():
    from pdserve.bench import server_phases

    rows = [[{"id": "w0", "steps": 10, "busy_seconds": 1.0, "gpu_seconds": 0.5, "gpu_gap_seconds": 0.1},
             {"id": "w1", "steps": 5, "busy_seconds": 2.0, "gpu_seconds": 0.0, "gpu_gap_seconds": 0.0}],
            [{"id": "w0", "steps": 110, "busy_seconds": 3.0, "gpu_seconds": 2.5, "gpu_gap_seconds": 0.6},
             {"id": "w1", "steps": 15, "busy_seconds": 2.5, "gpu_seconds": 1.5, "gpu_gap_seconds": 0.0}]]

    async def scrape(i: int) -> dict[str, float] | None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=rows[i]))
        async with httpx.AsyncClient(transport=transport) as client:
            return await server_phases.scrape_workers(client, "http://server")

    use = server_phases.worker_use(asyncio.run(scrape(0)), asyncio.run(scrape(1)))
    assert use == {"steps": 110, "busy_seconds": pytest.approx(2.5), "gpu_seconds": pytest.approx(3.5),
                   "gpu_gap_seconds": pytest.approx(0.5), "gpu_idle_fraction": pytest.approx(0.125)}
    table = dict(server_phases._worker_rows(use))
    assert table["GPU idle between steps (%)"] == "12.5" and table["Worker steps"] == "110"
    cpu = server_phases.worker_use({"steps": 0.0, "busy_seconds": 0.0, "gpu_seconds": 0.0, "gpu_gap_seconds": 0.0},
                                   {"steps": 4.0, "busy_seconds": 1.0, "gpu_seconds": 0.0, "gpu_gap_seconds": 0.0})
    assert cpu is not None and cpu["gpu_idle_fraction"] is None
    assert dict(server_phases._worker_rows(cpu)) == {"Worker steps": "4"}
