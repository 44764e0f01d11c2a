"""The gateway's side of the pipeline: send requests to tokenizers, receive text back.

One receive loop dispatches every TextDelta to the stream of its request and keeps the latest
SchedulerStats and stage heartbeats, which answer /ready, /workers and the metrics gauges.
A stream is registered before its request is sent, so no delta can arrive unclaimed.

No open stream is ever left hanging or cut bare: if the scheduler falls silent past the liveness
timeout, or the gateway shuts down, every open stream receives a RequestFailed, which the client
sees as an error event (streaming) or a 5xx body. Sends never block for long: a peer that is
gone or stalled costs a bounded wait, never a stuck request handler.

Tokenizers sit behind a ROUTER socket: each request goes to the live tokenizer holding the fewest,
and the requests of a tokenizer that dies, stalls or restarts are sent to another one
(`tokenizer_pool.py`).
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
    TokenizerOutbound,
    choice_request_id,
)
from protocol.sockets import PullSocket, PushSocket, RouterSocket
from gateway.tokenizer_pool import TokenizerPool

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
    request: GenerateRequest | None = None  # kept until it starts, to send it again if need be
    tokenizer: bytes | None = None  # the tokenizer it was sent to

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
        self.tokenizers = TokenizerPool(liveness_timeout)
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task] = []
        self._redispatching: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self.to_tokenizers = RouterSocket(self._ctx, self.endpoints.tokenizer_in, Codec(TokenizerOutbound),
                                          Codec(TokenizerInbound), bind=True)
        self.to_scheduler = PushSocket(self._ctx, self.endpoints.scheduler_in, Codec(SchedulerInbound), bind=False)
        self.inbound = PullSocket(self._ctx, self.endpoints.gateway_in, Codec(GatewayInbound), bind=True)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch()),
                       asyncio.create_task(self._receive_tokenizers())]

    async def stop(self) -> None:
        self.fail_all(503, "pdserve is shutting down; the request was not finished")
        for task in self._tasks:
            task.cancel()
        for s in (self.to_tokenizers, self.to_scheduler, self.inbound):
            s.close()
        if self._ctx is not None:
            self._ctx.term()

    async def submit(self, req: GenerateRequest) -> RequestStream:
        stream = RequestStream(req.request_id, req.n, request=req)
        self.streams[req.request_id] = stream
        await self._dispatch(stream)
        return stream

    async def _dispatch(self, stream: RequestStream) -> None:
        """Send the request to a live tokenizer; one that cannot take it is dropped (its
        requests go elsewhere) and the next is tried."""
        tried: set[bytes] = set()
        while stream.request is not None and not stream.failed:
            identity = self.tokenizers.pick(time.monotonic(), avoid=tried)
            if identity is None:
                self.fail(stream, 503, "no tokenizer is live; try again shortly")
                return
            tried.add(identity)
            try:
                await self.to_tokenizers.send_within(identity, stream.request, SEND_TIMEOUT)
            except zmq.ZMQError as exc:
                log.warning("tokenizer %s took nothing (%s): sending its requests to another",
                            identity.decode(errors="replace"), exc)
                self._redispatch(self.tokenizers.remove(identity))
                continue
            stream.tokenizer = identity
            self.tokenizers.hold(identity, stream.request_id)
            return

    def _redispatch(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            stream = self.streams.get(rid)
            if stream is not None and not stream.started and not stream.failed:
                stream.tokenizer = None
                task = asyncio.get_running_loop().create_task(self._dispatch(stream))
                self._redispatching.add(task)
                task.add_done_callback(self._redispatching.discard)

    def _past_tokenizer(self, stream: RequestStream) -> None:
        self.tokenizers.release(stream.tokenizer, stream.request_id)
        stream.request = None

    async def _receive_tokenizers(self) -> None:
        """Tokenizer heartbeats: liveness, their routing identity, and restarts (a new pid)."""
        while True:
            try:
                identity, hb = await self.to_tokenizers.recv()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bad message on tokenizer_in")
                continue
            now = time.monotonic()
            self.stages[(hb.stage, hb.stage_id)] = (hb, now)
            lost = self.tokenizers.heartbeat(identity, hb.pid, now)
            if lost:
                log.warning("tokenizer %s restarted: sending its %d request(s) again", hb.stage_id, len(lost))
                self._redispatch(lost)

    async def close_stream(self, stream: RequestStream) -> None:
        """The client is done with it: abort unfinished choices so their KV blocks come back."""
        self.streams.pop(stream.request_id, None)
        self._past_tokenizer(stream)
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
            self._past_tokenizer(stream)
            stream.queue.put_nowait(RequestFailed(stream.request_id, status, message, None, code))

    def fail_all(self, status: int, message: str, code: str | None = None) -> None:
        for stream in list(self.streams.values()):
            self.fail(stream, status, message, code)

    async def _watch(self) -> None:
        """Fail every open stream when the scheduler falls silent: it is gone or stalled, and
        a stream would otherwise wait for its request timeout."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for identity, held in self.tokenizers.expire(time.monotonic()).items():
                log.warning("tokenizer %s is silent: sending its %d request(s) to another",
                            identity.decode(errors="replace"), len(held))
                self._redispatch(held)
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
                        if not stream.started:
                            stream.started = True
                            self._past_tokenizer(stream)
                        stream.queue.put_nowait(delta)
                    if delta.finish_reason is not None and self.on_finish is not None:
                        self.on_finish()
            elif isinstance(msg, RequestFailed):
                stream = self.streams.get(msg.request_id)
                if stream is not None and not stream.failed:
                    stream.failed = True
                    self._past_tokenizer(stream)
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

    def readiness(self) -> tuple[bool, str]:
        """Ready (serving) while the scheduler reports with a ready worker and at least one
        tokenizer and one detokenizer are live: a lost stage degrades the stack, not stops it."""
        if self.stats is None or time.monotonic() - self.stats_seen > self.liveness_timeout:
            return False, "the scheduler is not connected"
        if not any(w.state == "ready" for w in self.stats.workers):
            return False, "no model worker is ready"
        for stage in ("tokenizer", "detokenizer"):
            if not self.live_stages(stage):
                return False, f"no {stage} is live"
        return True, "ready"

    def stage_counts(self, tokenizers: int, detokenizers: int, workers: int) -> dict[str, dict[str, int]]:
        """Live and expected (as launched) count of each kind of stage."""
        scheduler = self.stats is not None and time.monotonic() - self.stats_seen <= self.liveness_timeout
        ready = sum(1 for w in self.stats.workers if w.state == "ready") if scheduler and self.stats else 0
        return {"scheduler": {"live": int(scheduler), "expected": 1},
                "tokenizers": {"live": len(self.live_stages("tokenizer")), "expected": tokenizers},
                "detokenizers": {"live": len(self.live_stages("detokenizer")), "expected": detokenizers},
                "model_workers": {"live": ready, "expected": workers}}
