"""The gateway's side of the pipeline: send requests to tokenizers, receive text back.

One receive loop dispatches every TextDelta to the stream of its request and keeps the latest
SchedulerStats and stage heartbeats, which answer /ready, /workers and the metrics gauges.
A stream is registered before its request is sent, so no delta can arrive unclaimed.

No open stream is ever left hanging or cut bare: if the scheduler falls silent past the liveness
timeout, or the gateway shuts down, every open stream receives a RequestFailed, which the client
sees as an error event (streaming) or a 5xx body. Sends never block for long: a peer that is
gone or stalled costs a bounded wait, never a stuck request handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from protocol.codec import Codec
from protocol.endpoints import Endpoints
from protocol.messages import (
    AbortRequests,
    GatewayInbound,
    GenerateRequest,
    RequestFailed,
    SchedulerInbound,
    SchedulerStats,
    StageHeartbeat,
    TextDelta,
    TextOutputs,
    TokenizerInbound,
    choice_request_id,
)
from protocol.sockets import PullSocket, PushSocket

log = logging.getLogger("pdserve.gateway")
SEND_TIMEOUT = 2.0  # seconds a send to the tokenizers or the scheduler may wait for room
WATCH_INTERVAL = 0.25  # how often the scheduler's silence is checked


@dataclass
class RequestStream:
    """Everything that comes back for one client request: deltas of its n choices, or a failure."""

    request_id: str
    n: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[int] = field(default_factory=set)
    failed: bool = False  # a RequestFailed was queued: nothing more will come
    started: bool = False  # some output arrived: it is past the waiting queue

    @property
    def done(self) -> bool:
        return len(self.finished) == self.n

    async def next(self) -> TextDelta | RequestFailed:
        item = await self.queue.get()
        if isinstance(item, TextDelta) and item.finish_reason is not None:
            self.finished.add(item.index)
        return item


class EngineClient:
    def __init__(self, endpoints: Endpoints, liveness_timeout: float) -> None:
        self.endpoints = endpoints
        self.liveness_timeout = liveness_timeout
        self.streams: dict[str, RequestStream] = {}
        self.stats: SchedulerStats | None = None
        self.stats_seen = 0.0
        self.on_stats: Callable[[SchedulerStats], None] | None = None  # each stats message, once
        self.on_finish: Callable[[], None] | None = None  # each choice that finishes
        self.stages: dict[tuple[str, str], tuple[StageHeartbeat, float]] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self.to_tokenizers = PushSocket(self._ctx, self.endpoints.tokenizer_in, Codec(TokenizerInbound), bind=True)
        self.to_scheduler = PushSocket(self._ctx, self.endpoints.scheduler_in, Codec(SchedulerInbound), bind=False)
        self.inbound = PullSocket(self._ctx, self.endpoints.gateway_in, Codec(GatewayInbound), bind=True)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        self.fail_all(503, "pdserve is shutting down; the request was not finished")
        for task in self._tasks:
            task.cancel()
        for s in (self.to_tokenizers, self.to_scheduler, self.inbound):
            s.close()
        if self._ctx is not None:
            self._ctx.term()

    async def submit(self, req: GenerateRequest) -> RequestStream:
        stream = RequestStream(req.request_id, req.n)
        self.streams[req.request_id] = stream
        if not await self.to_tokenizers.send_within(req, SEND_TIMEOUT):
            self.fail(stream, 503, "no tokenizer took the request in time; try again shortly")
        return stream

    async def close_stream(self, stream: RequestStream) -> None:
        """The client is done with it: abort unfinished choices so their KV blocks come back."""
        self.streams.pop(stream.request_id, None)
        unfinished = [
            choice_request_id(stream.request_id, i, stream.n)
            for i in range(stream.n) if i not in stream.finished
        ]
        if unfinished and not await self.to_scheduler.send_within(AbortRequests(unfinished), SEND_TIMEOUT):
            log.warning("could not send the abort of %s: the scheduler is not taking messages",
                        stream.request_id)

    def choice_counts(self) -> tuple[int, int]:
        """(choices of open requests with no output yet, unfinished choices of started ones)."""
        pending = started = 0
        for s in self.streams.values():
            if s.failed:
                continue
            if s.started:
                started += s.n - len(s.finished)
            else:
                pending += s.n
        return pending, started

    def fail(self, stream: RequestStream, status: int, message: str, code: str | None = None) -> None:
        """End one open stream with an error (once); its reader turns it into the client's error."""
        if not stream.failed:
            stream.failed = True
            stream.queue.put_nowait(RequestFailed(stream.request_id, status, message, None, code))

    def fail_all(self, status: int, message: str, code: str | None = None) -> None:
        for stream in list(self.streams.values()):
            self.fail(stream, status, message, code)

    async def _watch(self) -> None:
        """Fail every open stream when the scheduler falls silent: it is gone or stalled, and
        a stream would otherwise wait for its request timeout."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            silent = time.monotonic() - self.stats_seen
            if self.stats is not None and silent > self.liveness_timeout and self.streams:
                log.error("the scheduler has been silent for %.1f s; failing %d open request(s)",
                          silent, len(self.streams))
                self.fail_all(503, f"the scheduler stopped responding ({silent:.0f} s without "
                              "news); the request was lost")

    async def _receive(self) -> None:
        while True:
            try:
                msg = await self.inbound.recv()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bad message on gateway_in")
                continue
            if isinstance(msg, TextOutputs):
                for delta in msg.deltas:
                    stream = self.streams.get(delta.request_id)
                    if stream is not None:
                        stream.started = True
                        stream.queue.put_nowait(delta)
                    if delta.finish_reason is not None and self.on_finish is not None:
                        self.on_finish()
            elif isinstance(msg, RequestFailed):
                stream = self.streams.get(msg.request_id)
                if stream is not None and not stream.failed:
                    stream.failed = True
                    stream.queue.put_nowait(msg)
            elif isinstance(msg, SchedulerStats):
                self.stats, self.stats_seen = msg, time.monotonic()
                if self.on_stats is not None:
                    self.on_stats(msg)
            elif isinstance(msg, StageHeartbeat):
                self.stages[(msg.stage, msg.stage_id)] = (msg, time.monotonic())

    # ------------------------------------------------------------------ health

    def live_stages(self, stage: str) -> list[StageHeartbeat]:
        now = time.monotonic()
        return [hb for (kind, _), (hb, seen) in self.stages.items()
                if kind == stage and now - seen <= self.liveness_timeout]

    def readiness(self, tokenizers: int, detokenizers: int) -> tuple[bool, str]:
        """Ready when the scheduler reports, with a ready worker, and enough live stages."""
        if self.stats is None or time.monotonic() - self.stats_seen > self.liveness_timeout:
            return False, "the scheduler is not connected"
        if not any(w.state == "ready" for w in self.stats.workers):
            return False, "no model worker is ready"
        if len(self.live_stages("tokenizer")) < tokenizers:
            return False, f"{len(self.live_stages('tokenizer'))}/{tokenizers} tokenizers connected"
        if len(self.live_stages("detokenizer")) < detokenizers:
            return False, f"{len(self.live_stages('detokenizer'))}/{detokenizers} detokenizers connected"
        return True, "ready"
