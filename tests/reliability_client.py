"""Client-side probes for the reliability tests: read one stream to its end and say how it ended."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LONG_CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about dragons."}],
             "max_tokens": 2000, "ignore_eos": True}


@dataclass
class StreamOutcome:
    """How one streamed request ended, as its client saw it."""

    status: int | None = None
    tokens: list[str] = field(default_factory=list)  # content deltas, in order
    errors: list[dict] = field(default_factory=list)  # SSE error events
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` arrived
    cut: str | None = None  # the connection broke (or timed out) before the stream ended
    ended_at: float | None = None

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


def stage_pids(pids: list[int], stage: str) -> list[int]:
    """Of `pids`, the processes running `pdserve <stage>`."""
    out = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stage.encode() in argv:
            out.append(pid)
    return out
