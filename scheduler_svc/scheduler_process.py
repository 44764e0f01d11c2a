"""`pdserve scheduler`: the one central scheduler process, the socket shell around CentralScheduler.

Sockets: PULL `scheduler_in` (AddRequest/AbortRequests from tokenizers and the gateway), ROUTER
`worker_router` (workers: Hello, StepResult, Heartbeat, WorkerError, KVPullDone, WorkerDraining;
to them: plans, KVPull/KVCancel, Accepted/Refused/Unknown, Shutdown), ROUTER `detokenizer_in`
(detokenizers: heartbeats, stop-string aborts; outputs go back to them), PUSH to `gateway_in`
(rejections and periodic SchedulerStats). What to do on each event is decided by
`central.CentralScheduler` (pure logic); this module only carries it out. Each worker has up to
--max-inflight-steps plans queued: when a result comes back the queue is topped up at once. All of
a request's outputs go to the detokenizer chosen when it was admitted. A worker silent past the
liveness timeout is declared dead and its requests move to other workers; a message from a
worker the scheduler does not know is answered with WorkerUnknown, so the worker registers again.
Every send waits at most SEND_TIMEOUT for a stalled peer (a worker or detokenizer that takes
nothing is then lost, a stats message to a stalled gateway dropped), so the loops that also
watch liveness never block. Requests never scheduled within --max-queue-time fail with a 503.
The periodic side (liveness sweep, expiries, stats) is in `service_upkeep.py`.
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
    KVPullDone,
    RequestFailed,
    RequestOutput,
    SchedulerInbound,
    StageHeartbeat,
    StepResult,
    ToWorker,
    WorkerAccepted,
    WorkerDraining,
    WorkerError,
    WorkerHello,
    WorkerRefused,
    WorkerUnknown,
)
from protocol.sockets import PullSocket, PushSocket, RouterSocket
from scheduler_svc.central import CentralScheduler, NoWorkerReady
from scheduler_svc.detok_table import DetokTable
from scheduler_svc.effects import Effects
from scheduler_svc.service_timing import SEND_TIMEOUT, UNKNOWN_REPLY_INTERVAL
from scheduler_svc.service_upkeep import ServiceUpkeep
from scheduler_svc.throughput_log import ThroughputLog
from scheduler_svc.worker_scheduler import QueueFull, RequestRejected
from scheduler_svc.worker_slot import DEAD, WorkerSlot

log = logging.getLogger("pdserve.scheduler")


class SchedulerService(ServiceUpkeep):
    def __init__(
        self, sched: SchedulerSettings, cache: CacheSettings, stage: StageSettings,
        endpoints: Endpoints, seed: int = 0,
    ) -> None:
        self.sched, self.cache, self.stage = sched, cache, stage
        self.central = CentralScheduler(sched, cache, seed)
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
        self.detoks = DetokTable(keep_delivered=2 * stage.liveness_timeout)
        self.early_aborts: dict[str, float] = {}  # aborted before their AddRequest arrived
        # Ended or refused requests: a second AddRequest for one (the gateway sent a request
        # again because its tokenizer died after passing it on) is ignored.
        self.ended: dict[str, float] = {}
        self.unknown_replied: dict[bytes, float] = {}
        self.integrity_failures = 0
        self._last_integrity = time.monotonic()
        self.throughput_log = ThroughputLog(sched.log_stats_interval, time.monotonic())

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
        if msg.request_id in self.central.requests or msg.request_id in self.ended:
            return  # sent again by the gateway after a tokenizer died: it is here already
        self.ended[msg.request_id] = time.monotonic()  # until it is admitted (refusals stay)
        client_id = msg.parent_id or msg.request_id
        detok = self.detoks.pick()
        if detok is None:
            await self._fail(client_id, 503, "no detokenizer is ready; try again shortly")
            return
        try:
            slot = self.central.add(msg, time.time())
        except NoWorkerReady:
            await self._fail(client_id, 503, "no model worker is ready; try again shortly")
            return
        except RequestRejected as exc:
            await self._fail(client_id, 400, str(exc), exc.param)
            return
        except QueueFull as exc:
            await self._fail(client_id, 429, f"server overloaded: {exc}; retry later",
                             code="rate_limit_exceeded")
            return
        rid = msg.request_id
        self.ended.pop(rid, None)
        self.detoks.assign(rid, client_id, detok)
        wants_prompt = msg.params.echo or msg.params.prompt_logprobs is not None
        try:
            await self.detok_sock.send_within(detok, DetokRequest(
                rid, client_id, msg.index, msg.prompt_token_ids[-DETOK_PROMPT_TAIL:],
                len(msg.prompt_token_ids), msg.params,
                prompt_token_ids=list(msg.prompt_token_ids) if wants_prompt else [],
            ), SEND_TIMEOUT)
        except zmq.ZMQError:
            await self._detok_lost(detok)  # fails this request too
            return
        await self._kick(slot, pipeline=False)

    async def _abort(self, ids: list[str], reason: FinishReason, error: str = "") -> None:
        known = [rid for rid in ids if rid in self.central.where]
        if reason == FinishReason.ABORT:
            for rid in ids:
                if rid not in self.central.where:
                    self.early_aborts[rid] = time.monotonic()
        if known:
            await self._apply(self.central.abort(known, reason, time.time(), error))

    async def _fail(self, request_id: str, status: int, message: str, param: str | None = None,
                    code: str | None = None) -> None:
        if not await self.gateway.send_within(RequestFailed(request_id, status, message, param, code),
                                              SEND_TIMEOUT):
            log.error("the gateway took no message for %.0f s: the failure of %s is lost",
                      SEND_TIMEOUT, request_id)

    # ------------------------------------------------------------------ workers

    async def _on_worker(self, item) -> None:
        identity, msg = item
        if isinstance(msg, WorkerHello):
            await self._on_hello(identity, msg)
            return
        slot = self.central.workers.get(msg.worker_id)
        if slot is None or slot.state == DEAD or slot.identity != identity:
            await self._unknown(identity, msg.worker_id)
            return
        slot.heard_from(time.monotonic())
        now = time.time()
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, StepResult):
            await self._apply(self.central.on_result(slot, msg, now), pipeline=True)
        elif isinstance(msg, KVPullDone):
            if not msg.ok:
                log.warning("KV transfer %d into %s failed: %s", msg.transfer_id, msg.worker_id, msg.error)
            await self._apply(self.central.on_pull_done(msg, now), pipeline=True, check=not msg.ok)
        elif isinstance(msg, WorkerError):
            await self._apply(self.central.on_step_error(slot, msg, now), pipeline=True, check=True)
        elif isinstance(msg, WorkerDraining):
            log.info("worker %s is draining", msg.worker_id)
            await self._apply(self.central.drain(slot, now), pipeline=True, check=True)

    async def _on_hello(self, identity: bytes, msg: WorkerHello) -> None:
        slot, reason, effects = self.central.register(msg, identity, time.time())
        if slot is None:
            log.error("worker %s refused: %s", msg.worker_id, reason)
            await self._send(None, identity, WorkerRefused(msg.worker_id, reason))
        else:
            log.info("worker %s (%s) joined: %d blocks, context %d, KV at %s", msg.worker_id,
                     msg.role.name.lower(), msg.num_kv_blocks, msg.max_model_len, msg.kv_address or "-")
            self.unknown_replied.pop(identity, None)
            slot.last_seen = time.monotonic()  # liveness's clock (register() stamps wall time)
            await self._send(slot, identity, WorkerAccepted(msg.worker_id, os.getpid()))
        await self._apply(effects, pipeline=True, check=bool(effects.outputs or effects.messages))

    async def _unknown(self, identity: bytes, worker_id: str) -> None:
        """Tell a worker the scheduler has no record of it (restart, or declared dead)."""
        now = time.monotonic()
        if now - self.unknown_replied.get(identity, 0.0) < UNKNOWN_REPLY_INTERVAL:
            return
        self.unknown_replied[identity] = now
        await self._send(None, identity, WorkerUnknown(worker_id))

    async def _send(self, slot: WorkerSlot | None, identity: bytes, msg) -> bool:
        try:
            await self.workers_sock.send_within(identity, msg, SEND_TIMEOUT)
            return True
        except zmq.ZMQError as exc:
            if slot is not None:
                await self._apply(self.central.worker_lost(slot, f"is unreachable ({exc})", time.time()),
                                  check=True)
            return False

    async def _kick(self, slot: WorkerSlot, pipeline: bool) -> None:
        """Send the worker the plans it can take now (see WorkerSlot.next_plan)."""
        if slot.state == DEAD:
            return
        plans, effects = self.central.plans(slot, pipeline, time.time())
        for plan in plans:
            if not await self._send(slot, slot.identity, plan):
                return
        if effects.messages or effects.kick:
            await self._apply(effects, pipeline)

    async def _apply(self, effects: Effects, pipeline: bool = True, check: bool = False) -> None:
        """Carry out what the central scheduler decided: messages, then plans, then outputs."""
        for slot, msg in effects.messages:
            await self._send(slot, slot.identity, msg)
        for slot in effects.kick.values():
            await self._kick(slot, pipeline)
        await self._route(effects.outputs)
        if check:
            self._check_integrity()

    async def _declare_dead(self, slot: WorkerSlot, why: str) -> None:
        log.error("worker %s is dead: %s", slot.worker_id, why)
        await self._apply(self.central.worker_lost(slot, why, time.time()), check=True)

    async def _route(self, outs: list[RequestOutput]) -> None:
        """Send outputs to each request's detokenizer; forget requests that finished."""
        batches: dict[bytes, list[RequestOutput]] = {}
        for out in outs:
            rid = out.request_id
            detok = self.detoks.of(rid)
            if detok is not None:
                batches.setdefault(detok, []).append(out)
            if out.finish_reason is not None:
                self._forget(rid)
        for detok, batch in batches.items():
            try:
                await self.detok_sock.send_within(detok, EngineOutputs(batch, time.time()), SEND_TIMEOUT)
            except zmq.ZMQError:
                await self._detok_lost(detok)

    def _forget(self, rid: str) -> None:
        now = time.monotonic()
        self.ended[rid] = now
        self.detoks.finish(rid, now)

    def _check_integrity(self) -> None:
        """Full accounting check after a failure event (and periodically under a flag): a
        contradiction is logged loudly and counted in the stats, never allowed to pass silently."""
        try:
            self.central.check_integrity()
        except AssertionError as exc:
            self.integrity_failures += 1
            log.error("KV accounting integrity check failed: %s", exc)

    # ------------------------------------------------------------------ detokenizers

    async def _on_detok(self, item) -> None:
        identity, msg = item
        if isinstance(msg, StageHeartbeat):
            if self.detoks.heartbeat(identity, msg.pid, time.monotonic()):
                log.warning("detokenizer %s restarted: failing the requests it held", msg.stage_id)
                await self._detok_lost(identity)
                self.detoks.heartbeat(identity, msg.pid, time.monotonic())
        elif isinstance(msg, AbortRequests):
            await self._abort(msg.request_ids, msg.reason)

    async def _detok_lost(self, detok: bytes) -> None:
        # Its live requests, and those whose last text it had just been sent (the gateway ignores
        # the failure of a request whose text did arrive).
        lost, clients = self.detoks.lose(detok)
        await self._abort(lost, FinishReason.ERROR)
        for client in clients:
            await self._fail(client, 503, "the detokenizer serving this request died")

