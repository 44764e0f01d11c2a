"""One streaming OpenAI request -> one timing record.

The parsing and timing are pure (SSEParser, StreamTracker: the caller passes bytes and clock
readings) so they are tested exactly; send_request only wires them to an aiohttp stream.

The streams go through aiohttp, as vLLM's and SGLang's benchmark clients do: with httpx, a
client sending 1,500 streams at once took 5.8 s to get its first request to the server and
13 s to its median first token, against 1.5 s and 2.5 s with aiohttp, on the same server and
machine (a busy 2-core VM; tests/benchmarks/client_ingest.py). A benchmark whose client falls
behind measures the client.

Timing definitions (the same for chat and completions):
  ttft  time from sending to the first chunk that carries choices;
  itl   gaps between successive chunks that carry generated text, the first one measured from
        the TTFT chunk (a bare finish_reason chunk or the usage chunk carries no token);
  e2e   time from sending to the end of the stream;
  tpot  (e2e - ttft) / (output_len - 1), None for a one-token output.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from pdserve.bench.datasets import BenchRequest


class SSEParser:
    """Incremental Server-Sent Events parser: feed raw bytes in any split, get `data` payloads.

    Handles \\n, \\r\\n and \\r line ends, multi-line data fields, comments and UTF-8
    characters cut between chunks; an event is complete at its blank line.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._decoder.decode(chunk)
        events = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            line, self._buffer = self._buffer[:cut[0]], self._buffer[cut[1]:]
            if line == "":
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> list[str]:
        """Flush a final event the server did not end with a blank line."""
        events = self.feed(b"\n\n") if (self._buffer or self._data) else []
        return events


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(end of the first line, start of the next) or None; a trailing \\r waits for a \\n."""
    for i, ch in enumerate(buffer):
        if ch == "\n":
            return i, i + 1
        if ch == "\r":
            if i + 1 == len(buffer):
                return None
            return (i, i + 2) if buffer[i + 1] == "\n" else (i, i + 1)
    return None


class StreamError(RuntimeError):
    """The server reported an error inside the stream."""


@dataclass
class RequestRecord:
    """What one request measured; times in seconds, start_time on the perf_counter clock."""

    index: int
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    start_time: float = 0.0
    usage_reported: bool = False

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.e2e is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)

    def to_json(self, bench_start: float) -> dict[str, Any]:
        out = asdict(self)
        out["start_time"] = self.start_time - bench_start
        out["tpot"] = self.tpot
        return out


def chunk_text(choice: dict[str, Any]) -> str:
    """The generated text of one streamed choice (completions `text` or a chat delta)."""
    if isinstance(choice.get("text"), str):
        return choice["text"]
    delta = choice.get("delta") or {}
    parts = [delta.get(k) for k in ("content", "reasoning_content", "reasoning")]
    return "".join(p for p in parts if isinstance(p, str))


class StreamTracker:
    """Folds a request's parsed chunks into a RequestRecord; the caller passes the clock."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self._last_token_time: float | None = None
        self._text_chunks = 0

    def on_chunk(self, chunk: Any, now: float) -> None:
        rec = self.record
        if not isinstance(chunk, dict):
            raise StreamError(f"a stream chunk is not a JSON object: {chunk!r:.100}")
        if "error" in chunk:
            err = chunk["error"]
            raise StreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            rec.prompt_len = int(usage.get("prompt_tokens") or rec.prompt_len)
            rec.output_len = int(usage.get("completion_tokens") or 0)
            rec.usage_reported = True
        choices = chunk.get("choices")
        if not choices:
            return
        first = rec.ttft is None
        if first:
            rec.ttft = now - rec.start_time
            self._last_token_time = now
        if any(chunk_text(c) for c in choices if isinstance(c, dict)):
            if not first:
                rec.itl.append(now - self._last_token_time)
            self._last_token_time = now
            self._text_chunks += 1

    def finish(self, now: float) -> RequestRecord:
        rec = self.record
        rec.e2e = now - rec.start_time
        if rec.ttft is None:
            rec.success, rec.error = False, "the stream ended without any choices"
            return rec
        if not rec.usage_reported:  # servers without include_usage: one token per text chunk
            rec.output_len = self._text_chunks
        rec.success = True
        return rec


def build_payload(endpoint: str, model: str, request: BenchRequest, ignore_eos: bool,
                  temperature: float | None = None) -> dict[str, Any]:
    """The JSON body for /v1/chat/completions ('chat') or /v1/completions ('completions')."""
    body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    elif endpoint == "completions":
        body["prompt"] = request.prompt
    else:
        raise ValueError(f"unknown endpoint {endpoint!r} (chat or completions)")
    if ignore_eos:
        body["ignore_eos"] = True
    if temperature is not None:
        body["temperature"] = temperature
    return body


ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def stream_session(max_connections: int | None, headers: dict[str, str] | None = None,
                   trust_env: bool = False) -> aiohttp.ClientSession:
    """The session the streams go through: at most `max_connections` open at once (None: no cap);
    no session-wide timeout (send_request bounds each request)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections or 0),
                                 headers=headers, trust_env=trust_env,
                                 timeout=aiohttp.ClientTimeout(total=None))


async def send_request(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], index: int,
                       expected_prompt_len: int, timeout: float) -> RequestRecord:
    """POST one streaming request and time it; never raises (failures become the record)."""
    record = RequestRecord(index=index, prompt_len=expected_prompt_len, start_time=time.perf_counter())
    tracker, parser = StreamTracker(record), SSEParser()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, json=payload) as response:
                if response.status != 200:
                    body = (await response.read()).decode("utf-8", "replace")
                    raise StreamError(f"HTTP {response.status}: {body[:300]}")
                async for raw in response.content.iter_any():
                    if _take_all(tracker, parser.feed(raw)):
                        break
                else:
                    _take_all(tracker, parser.close())
        return tracker.finish(time.perf_counter())
    except TimeoutError:
        return _failed(record, f"timed out after {timeout:g} s")
    except (StreamError, aiohttp.ClientError, ValueError) as exc:
        return _failed(record, f"{type(exc).__name__}: {exc}")


def _take_all(tracker: StreamTracker, payloads: list[str]) -> bool:
    """Feed SSE payloads (one clock reading for those that arrived together); True at [DONE]."""
    now = time.perf_counter()
    for data in payloads:
        if data.strip() == "[DONE]":
            return True
        tracker.on_chunk(json.loads(data), now)
    return False


def _failed(record: RequestRecord, error: str) -> RequestRecord:
    record.success, record.error = False, error
    record.e2e = time.perf_counter() - record.start_time
    return record
