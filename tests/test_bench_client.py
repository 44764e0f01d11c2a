"""`pdserve bench` client side: SSE parsing, stream timing, request payloads (pure parts).

No server here: the end-to-end run against a real `pdserve up` lives with the serving tests.
"""

from __future__ import annotations

import random

import pytest

from pdserve.bench.client import (RequestRecord, SSEParser, StreamError, StreamTracker,
                                  build_payload)
from pdserve.bench.datasets import BenchRequest


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
