"""The client side of fault injection: streams read to their end with how each ended, a steady
streaming load, and polling the server's state (its stack's processes: pdserve.stack_processes)."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamOutcome:
    """How one streamed request ended, as its client saw it."""

    status: int | None = None
    tokens: list[str] = field(default_factory=list)  # content deltas, in order
    errors: list[dict] = field(default_factory=list)  # SSE error events
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` arrived
    cut: str | None = None  # the connection broke (or timed out) before the stream ended
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    completion_tokens: int | None = None  # from the usage chunk

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def clean(self) -> bool:
        """Ended in words: an error status with an error body before the stream began, or a
        stream that finished or carried an error event, then [DONE]; never a bare cut."""
        if self.cut is not None:
            return False
        if self.status != 200:
            return bool(self.errors)
        return self.done and (self.finish_reason is not None or bool(self.errors))


def read_stream(url: str, body: dict, outcome: StreamOutcome, timeout: float = 120.0,
                stop: threading.Event | None = None) -> None:
    """POST a streamed chat request and record every event into `outcome` (run it in a thread);
    `stop` set: the client goes away."""
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=httpx.Timeout(timeout, connect=10)) as r:
            outcome.status = r.status_code
            if r.status_code != 200:
                r.read()
                outcome.errors.append(r.json().get("error", {}))
                return
            for line in r.iter_lines():
                if stop is not None and stop.is_set():
                    outcome.cut = "client left"
                    return
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    outcome.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    outcome.errors.append(event["error"])
                    continue
                if event.get("usage"):
                    outcome.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    outcome.tokens.append(choice["delta"].get("content") or "")
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
    except httpx.HTTPError as exc:
        outcome.cut = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.ended_at = time.monotonic()


def start_stream(url: str, body: dict, timeout: float = 120.0,
                 stop: threading.Event | None = None) -> tuple[StreamOutcome, threading.Thread]:
    outcome = StreamOutcome()
    thread = threading.Thread(target=read_stream, args=(url, body, outcome, timeout, stop), daemon=True)
    thread.start()
    return outcome, thread


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class StreamLoad:
    """`concurrency` clients, each streaming one request after another until stopped; every
    outcome is kept, with when it started and ended."""

    def __init__(self, url: str, body: dict, concurrency: int, timeout: float = 120.0) -> None:
        self.url, self.body, self.timeout = url, body, timeout
        self.outcomes: list[StreamOutcome] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]

    def start(self) -> StreamLoad:
        for t in self.threads:
            t.start()
        return self

    def _client(self) -> None:
        while not self.stop_event.is_set():
            outcome = StreamOutcome()
            self.outcomes.append(outcome)
            read_stream(self.url, self.body, outcome, self.timeout)
            if outcome.status == 429 or outcome.status == 503:
                time.sleep(0.2)

    def stop(self, timeout: float = 180.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)

    def in_flight_at(self, moment: float) -> list[StreamOutcome]:
        return [o for o in self.outcomes if o.started_at <= moment and (o.ended_at is None or o.ended_at > moment)]
