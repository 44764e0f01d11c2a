"""`pdserve scheduler`: the one central scheduler process.

Sockets: PULL `scheduler_in` (AddRequest/AbortRequests from tokenizers and the gateway), ROUTER
`worker_router` (workers: Hello, StepResult, Heartbeat, WorkerError), ROUTER `detokenizer_in`
(detokenizers: heartbeats, stop-string aborts; outputs go back to them), PUSH to `gateway_in`
(rejections and periodic SchedulerStats). Each worker has up to --max-inflight-steps steps
queued: when a result comes back the queue is topped up at once, so the worker starts its next
step without waiting for the scheduler (it feeds its own samples forward). All of a request's
outputs go to the detokenizer chosen when it was admitted. A worker or detokenizer that falls silent past
the liveness timeout is declared dead and its requests end with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq
import zmq.asyncio

from protocol.codec import Codec
from protocol.config import CacheSettings, SchedulerSettings, StageSettings
from protocol.endpoints import Endpoints
from protocol.messages import (
    DETOK_PROMPT_TAIL,
    AbortRequests,
    AddRequest,
    DetokenizerInbound,
    DetokenizerOutbound,
    DetokRequest,
    EngineOutputs,
    FinishReason,
    FromWorker,
    GatewayInbound,
    Heartbeat,
    RequestFailed,
    RequestOutput,
    SchedulerInbound,
    SchedulerStats,
    StageHeartbeat,
    StepResult,
    ToWorker,
    WorkerAccepted,
    WorkerError,
    WorkerHello,
)
from protocol.sockets import PullSocket, PushSocket, RouterSocket
from scheduler_svc.scheduler import QueueFull, RequestRejected
from scheduler_svc.worker_slot import WorkerSlot, least_loaded

log = logging.getLogger("pdserve.scheduler")
STATS_INTERVAL = 0.5
EARLY_ABORT_MEMORY = 60.0  # seconds an abort for a not-yet-arrived request is remembered


class SchedulerService:
    def __init__(
        self, sched: SchedulerSettings, cache: CacheSettings, stage: StageSettings,
        endpoints: Endpoints, seed: int = 0,
    ) -> None:
        self.sched, self.cache, self.stage, self.seed = sched, cache, stage, seed
        self.ctx = zmq.asyncio.Context()
        self.inbound = PullSocket(self.ctx, endpoints.scheduler_in, Codec(SchedulerInbound), bind=True)
        self.workers_sock = RouterSocket(
            self.ctx, endpoints.worker_router, Codec(FromWorker), Codec(ToWorker), bind=True
        )
        self.detok_sock = RouterSocket(
            self.ctx, endpoints.detokenizer_in, Codec(DetokenizerOutbound),
            Codec(DetokenizerInbound), bind=True,
        )
        self.gateway = PushSocket(self.ctx, endpoints.gateway_in, Codec(GatewayInbound), bind=False)
        self.workers: dict[str, WorkerSlot] = {}
        self.detoks: dict[bytes, float] = {}  # identity -> last heartbeat
        self.detok_load: dict[bytes, int] = {}
        self.request_worker: dict[str, str] = {}
        self.request_detok: dict[str, bytes] = {}
        self.arrival: dict[str, float] = {}
        self.client_id: dict[str, str] = {}
        self.early_aborts: dict[str, float] = {}  # aborted before their AddRequest arrived

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._loop(self.inbound.recv, self._on_inbound)),
            asyncio.create_task(self._loop(self.workers_sock.recv, self._on_worker)),
            asyncio.create_task(self._loop(self.detok_sock.recv, self._on_detok)),
            asyncio.create_task(self._housekeeping()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for s in (self.inbound, self.workers_sock, self.detok_sock, self.gateway):
                s.close()
            self.ctx.term()

    async def _loop(self, recv, handle) -> None:
        while True:
            msg = await recv()
            try:
                await handle(msg)
            except Exception:  # one bad message must not stop the scheduler
                log.exception("while handling %r", type(msg).__name__)

    # ------------------------------------------------------------------ requests

    async def _on_inbound(self, msg) -> None:
        if isinstance(msg, AbortRequests):
            await self._abort(msg.request_ids, msg.reason)
        else:
            await self._add(msg)

    async def _add(self, msg: AddRequest) -> None:
        if self.early_aborts.pop(msg.request_id, None) is not None:
            return  # the client left while its request was being tokenized
        client_id = msg.parent_id or msg.request_id
        slot = least_loaded(list(self.workers.values()))
        live_detoks = [d for d in self.detoks if d in self.detok_load]
        if slot is None or not live_detoks:
            what = "model worker" if slot is None else "detokenizer"
            await self._fail(client_id, 503, f"no {what} is ready; try again shortly")
            return
        try:
            slot.scheduler.add_request(msg)
        except RequestRejected as exc:
            await self._fail(client_id, 400, str(exc), exc.param)
            return
        except QueueFull as exc:
            await self._fail(client_id, 429, f"server overloaded: {exc}", code="overloaded")
            return
        detok = min(live_detoks, key=lambda d: self.detok_load[d])
        self.detok_load[detok] += 1
        rid = msg.request_id
        self.request_worker[rid] = slot.worker_id
        self.request_detok[rid] = detok
        self.arrival[rid] = msg.arrival_time
        self.client_id[rid] = client_id
        await self.detok_sock.send(detok, DetokRequest(
            rid, client_id, msg.index, msg.prompt_token_ids[-DETOK_PROMPT_TAIL:],
            len(msg.prompt_token_ids), msg.params,
        ))
        await self._kick(slot)

    async def _abort(self, ids: list[str], reason: FinishReason, error: str = "") -> None:
        by_worker: dict[str, list[str]] = {}
        for rid in ids:
            if rid in self.request_worker:
                by_worker.setdefault(self.request_worker[rid], []).append(rid)
            elif reason == FinishReason.ABORT:
                self.early_aborts[rid] = time.monotonic()
        for wid, rids in by_worker.items():
            slot = self.workers[wid]
            outs = slot.scheduler.abort(rids, reason)
            for out in outs:
                out.error = error
            await self._route(slot, outs)
            await self._kick(slot)

    async def _fail(self, request_id: str, status: int, message: str, param: str | None = None,
                    code: str | None = None) -> None:
        await self.gateway.send(RequestFailed(request_id, status, message, param, code))

    # ------------------------------------------------------------------ workers

    async def _on_worker(self, item) -> None:
        identity, msg = item
        now = time.monotonic()
        if isinstance(msg, WorkerHello):
            old = self.workers.get(msg.worker_id)
            if old is not None:
                await self._declare_dead(old, "restarted")
            self.workers[msg.worker_id] = WorkerSlot.create(
                msg, identity, self.sched, self.cache, now, self.seed + len(self.workers)
            )
            log.info("worker %s joined: %d blocks, context %d", msg.worker_id,
                     msg.num_kv_blocks, msg.max_model_len)
            await self.workers_sock.send(identity, WorkerAccepted(msg.worker_id, os.getpid()))
            return
        slot = self.workers.get(msg.worker_id)
        if slot is None or slot.state != "ready":
            return
        slot.last_seen = now
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, StepResult):
            slot.complete(msg.step_id)
            slot.num_steps += 1
            slot.busy_seconds += msg.execute_seconds
            outputs = slot.scheduler.update(msg)
            await self._kick(slot, pipeline=True)  # plans first: the worker may be waiting
            await self._route(slot, outputs)
            return
        if isinstance(msg, WorkerError):
            plan = slot.complete(msg.step_id)
            if plan is not None:
                await self._route(slot, slot.scheduler.fail_step(plan, f"worker {msg.worker_id}: {msg.message}"))
        await self._kick(slot, pipeline=True)

    async def _kick(self, slot: WorkerSlot, pipeline: bool = False) -> None:
        """Send the worker the plans it can take now (see WorkerSlot.next_plan)."""
        while (plan := slot.next_plan(pipeline)) is not None:
            now = time.time()
            for s in plan.new_seqs:
                slot.first_scheduled.setdefault(s.request_id, now)
            try:
                await self.workers_sock.send(slot.identity, plan)
            except zmq.ZMQError as exc:
                await self._declare_dead(slot, f"unreachable ({exc})")
                return

    async def _declare_dead(self, slot: WorkerSlot, why: str) -> None:
        if slot.state == "dead":
            return
        slot.state = "dead"
        slot.inflight.clear()
        log.error("worker %s is dead: %s", slot.worker_id, why)
        ids = [r.request_id for r in slot.scheduler.running + slot.scheduler.waiting]
        outs = slot.scheduler.abort(ids, FinishReason.ERROR)
        for out in outs:
            out.error = f"worker {slot.worker_id} {why}; the request was lost"
        await self._route(slot, outs)

    async def _route(self, slot: WorkerSlot, outs: list[RequestOutput]) -> None:
        """Send outputs to each request's detokenizer; forget requests that finished."""
        batches: dict[bytes, list[RequestOutput]] = {}
        for out in outs:
            rid = out.request_id
            detok = self.request_detok.get(rid)
            if rid in slot.first_scheduled:
                out.queue_seconds = max(0.0, slot.first_scheduled.pop(rid) - self.arrival.get(rid, 0.0))
            if detok is not None:
                batches.setdefault(detok, []).append(out)
            if out.finish_reason is not None:
                slot.first_scheduled.pop(rid, None)
                self._forget(rid)
        for detok, batch in batches.items():
            try:
                await self.detok_sock.send(detok, EngineOutputs(batch, time.time()))
            except zmq.ZMQError:
                await self._detok_lost(detok)

    def _forget(self, rid: str) -> None:
        self.request_worker.pop(rid, None)
        self.arrival.pop(rid, None)
        self.client_id.pop(rid, None)
        detok = self.request_detok.pop(rid, None)
        if detok in self.detok_load:
            self.detok_load[detok] -= 1

    # ------------------------------------------------------------------ detokenizers

    async def _on_detok(self, item) -> None:
        identity, msg = item
        if isinstance(msg, StageHeartbeat):
            self.detoks[identity] = time.monotonic()
            self.detok_load.setdefault(identity, 0)
        elif isinstance(msg, AbortRequests):
            await self._abort(msg.request_ids, msg.reason)

    async def _detok_lost(self, detok: bytes) -> None:
        self.detoks.pop(detok, None)
        self.detok_load.pop(detok, None)
        lost = [rid for rid, d in self.request_detok.items() if d == detok]
        clients = {self.client_id.get(rid, rid) for rid in lost}
        for rid in lost:
            self.request_detok.pop(rid, None)
        await self._abort(lost, FinishReason.ERROR)
        for client in clients:
            await self._fail(client, 503, "the detokenizer serving this request died")

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            now = time.monotonic()
            for slot in list(self.workers.values()):
                if slot.state == "ready" and now - slot.last_seen > self.stage.liveness_timeout:
                    await self._declare_dead(slot, "stopped responding")
            for rid, when in list(self.early_aborts.items()):
                if now - when > EARLY_ABORT_MEMORY:
                    del self.early_aborts[rid]
            for detok, seen in list(self.detoks.items()):
                if now - seen > self.stage.liveness_timeout:
                    await self._detok_lost(detok)
            await self.gateway.send(self.stats())

    def stats(self) -> SchedulerStats:
        live = [s for s in self.workers.values() if s.state == "ready"]
        total = sum(s.kv.num_usable_blocks for s in live)
        used = sum(s.kv.num_usable_blocks * s.kv.usage for s in live)
        first = next(iter(live), None)
        return SchedulerStats(
            timestamp=time.time(),
            model=first.hello.model if first else "",
            max_model_len=min((s.hello.max_model_len for s in live), default=0),
            num_running=sum(len(s.scheduler.running) for s in live),
            num_waiting=sum(len(s.scheduler.waiting) for s in live),
            kv_cache_usage=used / total if total else 0.0,
            prefix_cache_queries=sum(s.scheduler.prefix_cache_queries for s in self.workers.values()),
            prefix_cache_hits=sum(s.scheduler.prefix_cache_hits for s in self.workers.values()),
            workers=[s.info() for s in self.workers.values()],
        )
