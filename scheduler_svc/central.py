"""The one central scheduler: registration, routing, KV handoffs, migration and draining.

It keeps one WorkerSlot (block accounting + batching policy) per worker and moves requests
between them, so it can plan both ends of a KV transfer and prove that no block leaked
(`check_integrity`). Pure logic: no sockets and no clock of its own; every method takes `now`
(time.time(), the clock of AddRequest.arrival_time) and returns `Effects` that the process
shell (`scheduler_process.py`) carries out: outputs to route, messages to send, workers to plan.

A disaggregated request's path: routed to a prefill worker (`routing.choose_route`), it is
prefilled and its first token sampled and streamed there; then it becomes OUTGOING (blocks kept),
a decode worker reserves blocks for the part of its KV it does not cache (`reserve_incoming`)
and is told to pull them (KVPull); on KVPullDone the decode side activates it and the prefill
side frees its blocks into its prefix cache. A transfer that fails, times out or loses a side
releases both sides' blocks and the request is recomputed elsewhere (migration), as are the
requests of a worker that dies or does not finish draining in time.
"""

from __future__ import annotations

import itertools
from collections import deque

from protocol.config import CacheSettings, SchedulerSettings
from protocol.messages import (
    AddRequest,
    FinishReason,
    RequestOutput,
    RequestPhases,
    Shutdown,
    StepPlan,
    StepResult,
    TransferRecord,
    WorkerError,
    WorkerHello,
    WorkerInfo,
)
from scheduler_svc.admission import num_waiting_for_slot, waiting_bound
from scheduler_svc.block_hash import BlockHash, extend_block_hashes
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.effects import Effects
from scheduler_svc.handoffs import Handoff, KVHandoffs, Transfer
from scheduler_svc.routing import Route, choose_route
from scheduler_svc.throughput_log import WorkTotals
from scheduler_svc.worker_scheduler import QueueFull, RequestRejected
from scheduler_svc.worker_slot import DEAD, DRAINING, READY, WorkerSlot

MAX_MIGRATIONS = 3  # a request moved this often is failed rather than moved again
DEPARTED_MEMORY = 32  # workers that left, still shown by /workers
MAX_STEP_RECORDS = 10_000  # per-step token counts kept between two stats (for a histogram)


class NoWorkerReady(RuntimeError):
    """No ready model worker can take a request now."""


class CentralScheduler(KVHandoffs):
    def __init__(self, sched: SchedulerSettings, cache: CacheSettings, seed: int = 0) -> None:
        self.sched, self.cache, self.seed = sched, cache, seed
        self.workers: dict[str, WorkerSlot] = {}
        self.departed: deque[WorkerInfo] = deque(maxlen=DEPARTED_MEMORY)
        self.step_ids = itertools.count(1)  # shared by every worker's policy
        self._transfer_ids = itertools.count(1)
        self._joined = 0
        self.requests: dict[str, Request] = {}  # every live request
        self.where: dict[str, WorkerSlot] = {}  # the worker that holds it (the source mid-transfer)
        self.transfers: dict[int, Transfer] = {}  # KVPulls in flight
        self.handoffs: dict[str, Handoff] = {}  # requests whose KV is moving, by id
        self.pending_handoffs: list[tuple[WorkerSlot, Request]] = []  # no destination found yet
        self.no_cuda_ipc: set[tuple[str, str]] = set()  # (src, dst) pairs whose cuda-ipc failed
        self.finished_transfers: list[TransferRecord] = []  # since the last stats
        self.finished_phases: list[RequestPhases] = []  # since the last stats
        self.step_tokens: list[int] = []  # tokens of each plan since the last stats (bounded)
        self.num_migrations = 0
        self.integrity_checks = 0
        self.work = WorkTotals()  # every worker's steps and tokens since start (throughput_log)
        # Cumulative counters of workers that left, so stack-wide totals never go backwards.
        self.departed_counts = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0}

    # ------------------------------------------------------------------ workers

    def register(self, hello: WorkerHello, identity: bytes, now: float) -> tuple[WorkerSlot | None, str, Effects]:
        """A WorkerHello: the new slot, or None and why the worker does not fit the stack."""
        effects = Effects()
        old = self.workers.pop(hello.worker_id, None)  # the same worker, restarted: it lost its state
        reason = self._misfit(hello)
        slot = None
        if not reason:
            slot = WorkerSlot.create(hello, identity, self.sched, self.cache, now,
                                     self.seed + self._joined, self.step_ids)
            self._joined += 1
            self.workers[hello.worker_id] = slot
        if old is not None:  # its requests may move to the new registration
            effects = self.worker_lost(old, "restarted", now)
        self._start_handoffs(now, effects)  # a decode worker joining may unblock waiting handoffs
        return slot, reason, effects

    def _misfit(self, hello: WorkerHello) -> str:
        for other in self.workers.values():
            o = other.hello
            if hello.model != o.model:
                return f"worker serves model {hello.model!r} but the stack serves {o.model!r}"
            if hello.vocab_size != o.vocab_size:
                return f"worker's vocabulary has {hello.vocab_size} tokens, the stack's {o.vocab_size}"
            if hello.block_size != o.block_size:
                return f"worker's KV block size is {hello.block_size}, the stack's {o.block_size}"
            if hello.kv_layout is not None and o.kv_layout is not None and hello.kv_layout != o.kv_layout:
                return f"worker's KV layout {hello.kv_layout} differs from the stack's {o.kv_layout}"
        return ""

    def drain(self, slot: WorkerSlot, now: float) -> Effects:
        """SIGTERM at a worker: no new work; waiting requests move now, running ones finish
        there until `drain_timeout`, then whatever is left moves too."""
        effects = Effects()
        if slot.state != READY:
            return effects
        slot.state = DRAINING
        slot.drain_deadline = now + self.sched.drain_timeout
        if any(s.is_ready for s in self.workers.values()):
            for req in slot.scheduler.take_waiting():
                self._migrate(req, f"worker {slot.worker_id} is draining", now, effects)
        self._finish_drains(effects)
        effects.plan(slot)
        return effects

    def worker_lost(self, slot: WorkerSlot, why: str, now: float) -> Effects:
        """The worker died or was declared dead: release its transfers, move its requests."""
        effects = Effects()
        if slot.state == DEAD:
            return effects
        slot.state = DEAD
        slot.inflight.clear()
        for h in [h for h in self.handoffs.values() if slot in (h.src, h.dst)]:
            self._end_handoff(h, f"worker {slot.worker_id} {why}", now, effects)
        self.pending_handoffs = [(s, r) for s, r in self.pending_handoffs if s is not slot]
        for req in slot.scheduler.take_all():
            self.where.pop(req.request_id, None)
            self._migrate(req, f"worker {slot.worker_id} {why}", now, effects)
        self._depart(slot, DEAD)
        return effects

    def _depart(self, slot: WorkerSlot, state: str) -> None:
        if self.workers.get(slot.worker_id) is slot:
            del self.workers[slot.worker_id]
        for name in self.departed_counts:
            self.departed_counts[name] += getattr(slot.scheduler, name)
        info = slot.info()
        info.state = state
        self.departed.append(info)

    # ------------------------------------------------------------------ requests

    def add(self, msg: AddRequest, now: float) -> WorkerSlot:
        """Route and queue a new request; raises NoWorkerReady, RequestRejected or QueueFull."""
        slots = self.workers.values()
        waiting, bound = num_waiting_for_slot(self.sched, slots), waiting_bound(self.sched, slots)
        if waiting >= bound:
            raise QueueFull(f"{waiting} requests are waiting for a batch slot already (the bound is {bound})")
        route = choose_route(list(self.workers.values()), self._hashes(msg.prompt_token_ids),
                             len(msg.prompt_token_ids), self.sched.max_local_prefill_tokens)
        if route is None:
            ready = [s.hello.max_model_len for s in self.workers.values() if s.is_ready]
            if ready:
                raise RequestRejected(
                    f"the prompt has {len(msg.prompt_token_ids)} tokens but the largest context of a "
                    f"ready worker is {max(ready)} tokens, which must also hold at least one "
                    f"generated token", "prompt")
            raise NoWorkerReady("no model worker is ready")
        req = route.slot.scheduler.add_request(msg, prefill_only=route.split)
        self.requests[req.request_id] = req
        self.where[req.request_id] = route.slot
        return route.slot

    def abort(self, request_ids: list[str], reason: FinishReason, now: float, error: str = "") -> Effects:
        """End these requests wherever they are (mid-transfer too); unknown ids are ignored."""
        effects = Effects()
        for rid in request_ids:
            slot = self.where.get(rid)
            if slot is None:
                continue
            h = self.handoffs.get(rid)
            if h is not None:  # the source's abort below frees the request there
                self._end_handoff(h, "aborted", now, effects, release_src=False, fault=False)
            self.pending_handoffs = [(s, r) for s, r in self.pending_handoffs if r.request_id != rid]
            outs = slot.scheduler.abort([rid], reason)
            for out in outs:
                out.error = error
            self._note_outputs(outs, now, effects)
            effects.plan(slot)
        self._finish_drains(effects)
        return effects

    def plans(self, slot: WorkerSlot, pipeline: bool, now: float) -> tuple[list[StepPlan], Effects]:
        """The plans to send the worker now (see WorkerSlot.next_plan); stamps first scheduling.
        The effects (after the plans) end early handoffs of requests the plans preempted."""
        plans = []
        while (plan := slot.next_plan(pipeline)) is not None:
            for seq in plan.new_seqs:
                req = self.requests.get(seq.request_id)
                if req is not None and not req.first_scheduled_at:
                    req.first_scheduled_at = now
            if len(self.step_tokens) < MAX_STEP_RECORDS:
                self.step_tokens.append(sum(s.num_scheduled_tokens for s in plan.new_seqs)
                                        + sum(s.num_scheduled_tokens for s in plan.cached_seqs))
            plans.append(plan)
        effects = Effects()
        if plans:
            self._end_stale_early_handoffs(slot, now, effects)
        return plans, effects

    def on_result(self, slot: WorkerSlot, result: StepResult, now: float) -> Effects:
        effects = Effects()
        plan = slot.complete(result.step_id)
        slot.num_steps += 1
        slot.busy_seconds += result.execute_seconds
        slot.gpu_seconds += result.gpu_seconds
        slot.gpu_gap_seconds += result.gpu_gap_seconds
        computed = 0 if plan is None else (sum(s.num_scheduled_tokens for s in plan.new_seqs)
                                           + sum(s.num_scheduled_tokens for s in plan.cached_seqs))
        w = self.work  # a plan that only frees finished requests is not a step
        self.work = WorkTotals(w.steps + (computed > 0), w.computed_tokens + computed,
                               w.generated_tokens + len(result.request_ids), w.busy_seconds + result.execute_seconds)
        outs = slot.scheduler.update(result)
        self._note_outputs(outs, now, effects)  # a first token goes out before any handoff news
        self._prefilled(slot, slot.scheduler.take_handoffs(), now, effects)
        self._early_parts(slot, plan, now, effects)
        self._end_stale_early_handoffs(slot, now, effects)  # e.g. finished at its first token
        effects.plan(slot)
        self._start_handoffs(now, effects)
        self._finish_drains(effects)
        return effects

    def on_step_error(self, slot: WorkerSlot, msg: WorkerError, now: float) -> Effects:
        effects = Effects()
        plan = slot.complete(msg.step_id)
        if plan is not None:
            outs = slot.scheduler.fail_step(plan, f"worker {msg.worker_id}: {msg.message}")
            self._note_outputs(outs, now, effects)
            self._end_stale_early_handoffs(slot, now, effects)
        effects.plan(slot)
        self._finish_drains(effects)
        return effects

    def _note_outputs(self, outs: list[RequestOutput], now: float, effects: Effects) -> None:
        """Stamp first-token and queue times, record phases of finished requests, forget them."""
        for out in outs:
            req = self.requests.get(out.request_id)
            if req is None:
                continue
            if out.new_token_ids and not req.first_token_at:
                req.first_token_at = now
                if req.first_scheduled_at:
                    out.queue_seconds = max(0.0, req.first_scheduled_at - req.arrival_time)
            if out.finish_reason is not None:
                if req.first_token_at:
                    self.finished_phases.append(_phases(req, now))
                del self.requests[out.request_id]
                self.where.pop(out.request_id, None)
        effects.outputs.extend(outs)

    # ------------------------------------------------------------------ migration

    def _migrate(self, req: Request, why: str, now: float, effects: Effects, counts: bool = True,
                 fallback: WorkerSlot | None = None) -> None:
        """Recompute `req` (prompt + outputs so far) on another worker, or fail it clearly.

        `counts`: a move forced by a fault (not a plain change of plan) counts toward
        MAX_MIGRATIONS and the migrations metric. `fallback`: a live worker (say, a draining
        one) that keeps the request when no ready worker can take it."""
        rid = req.request_id
        self.where.pop(rid, None)
        if counts:
            req.num_migrations += 1
            self.num_migrations += 1
        route = None
        if req.num_migrations <= MAX_MIGRATIONS:
            route = choose_route(list(self.workers.values()), self._hashes(req.token_ids),
                                 req.num_tokens, self.sched.max_local_prefill_tokens)
            if route is None and fallback is not None and fallback.state != DEAD:
                route = Route(fallback, False, 0)
        if route is not None:
            try:
                route.slot.scheduler.adopt(req, prefill_only=route.split)
            except RequestRejected as exc:
                why = f"{why}; {exc}"
            else:
                self.where[rid] = route.slot
                effects.plan(route.slot)
                return
        what = "moved too often" if req.num_migrations > MAX_MIGRATIONS else "no worker can take it"
        req.finish_reason = FinishReason.ERROR
        out = RequestOutput(rid, [], FinishReason.ERROR, num_prompt_tokens=req.num_prompt_tokens,
                            num_cached_tokens=max(req.num_cached_tokens, 0),
                            error=f"{why}; the request was lost ({what})")
        self._note_outputs([out], now, effects)

    # ------------------------------------------------------------------ time

    def expire(self, now: float) -> Effects:
        """Transfers past their deadline and drains past theirs; retry handoffs that waited."""
        effects = Effects()
        for t in [t for t in self.transfers.values() if now > t.deadline]:
            if t.handoff.request.request_id in self.handoffs:
                t.dst.missed_transfer = True  # the destination never answered: no new work until it does
                self._end_handoff(t.handoff, "KV transfer timed out", now, effects)
        for slot in [s for s in self.workers.values() if s.state == DRAINING and now > s.drain_deadline]:
            for h in [h for h in self.handoffs.values() if slot in (h.src, h.dst)]:
                self._end_handoff(h, f"worker {slot.worker_id} drained", now, effects)
            self.pending_handoffs = [(s, r) for s, r in self.pending_handoffs if s is not slot]
            for req in slot.scheduler.take_all():
                self.where.pop(req.request_id, None)
                self._migrate(req, f"worker {slot.worker_id} drained before the request finished", now, effects)
            effects.plan(slot)
        self._start_handoffs(now, effects)
        self._finish_drains(effects)
        return effects

    def _finish_drains(self, effects: Effects) -> None:
        for slot in [s for s in self.workers.values() if s.state == DRAINING]:
            idle = not slot.inflight and not slot.transfers_in and not slot.transfers_out
            if idle and slot.scheduler.is_empty and not any(s is slot for s, _ in self.pending_handoffs):
                effects.messages.append((slot, Shutdown("drained")))
                self._depart(slot, "drained")

    # ------------------------------------------------------------------ checks

    def _hashes(self, token_ids: list[int]) -> list[BlockHash]:
        slot = next(iter(self.workers.values()), None)
        hashes: list[BlockHash] = []
        if slot is not None and self.cache.enable_prefix_caching:
            extend_block_hashes(hashes, token_ids, slot.kv.block_size, len(token_ids))
        return hashes

    def check_integrity(self) -> None:
        """Every worker's accounting is sound and every request is where the maps say."""
        self.integrity_checks += 1
        held: dict[str, WorkerSlot] = {}
        for slot in self.workers.values():
            slot.scheduler.check_integrity()
            for rid in slot.scheduler.requests:
                if rid in slot.scheduler.incoming:
                    continue
                assert rid not in held, f"{rid} is held by {held[rid].worker_id} and {slot.worker_id}"
                held[rid] = slot
        assert held.keys() == self.where.keys(), (
            f"requests held {sorted(held)} != requests placed {sorted(self.where)}")
        for rid, slot in held.items():
            assert self.where[rid] is slot, f"{rid} is on {slot.worker_id}, placed on {self.where[rid].worker_id}"
        assert held.keys() == self.requests.keys(), "live requests != requests on workers"
        for rid, h in self.handoffs.items():
            assert h.request.request_id == rid and h.dst.scheduler.incoming.get(rid) is h.request, (
                f"{rid}: not reserved on {h.dst.worker_id}")
            on_src = h.src.scheduler.outgoing.get(rid) is h.request or (
                not h.final and h.src.scheduler.requests.get(rid) is h.request
                and h.request.status == RequestStatus.RUNNING)
            assert on_src, f"{rid}: neither prefilling nor outgoing on {h.src.worker_id}"
            assert h.first <= h.sent_upto and all(self.transfers[t].handoff is h for t in h.parts)
        for tid, t in self.transfers.items():
            assert tid in t.handoff.parts and self.handoffs.get(t.request.request_id) is t.handoff, (
                f"transfer {tid} is not part of a live handoff")
            assert len(t.src_block_ids) == len(t.dst_block_ids) > 0
        pending = [r.request_id for _, r in self.pending_handoffs]
        assert not set(pending) & set(self.handoffs), "a pending handoff already has a destination"
        for slot in self.workers.values():
            outs = sum(1 for t in self.transfers.values() if t.src is slot)
            ins = sum(1 for t in self.transfers.values() if t.dst is slot)
            assert (slot.transfers_out, slot.transfers_in) == (outs, ins), f"{slot.worker_id} transfer counts"
            assert len(slot.scheduler.incoming) == sum(1 for h in self.handoffs.values() if h.dst is slot), (
                f"{slot.worker_id}: reservations without handoffs")
            outgoing = sum(1 for h in self.handoffs.values() if h.src is slot and h.final)
            outgoing += sum(1 for s, _ in self.pending_handoffs if s is slot)
            assert len(slot.scheduler.outgoing) == outgoing, (
                f"{slot.worker_id}: outgoing requests without a handoff or a pending one")

    def total(self, name: str) -> int:
        """A cumulative counter of every worker's policy, including workers that have left."""
        return self.departed_counts[name] + sum(getattr(s.scheduler, name) for s in self.workers.values())

    def infos(self) -> list[WorkerInfo]:
        """Registered workers, then those that left (dead or drained) unless they came back."""
        return [s.info() for s in self.workers.values()] + [
            i for i in self.departed if i.worker_id not in self.workers]


def _phases(req: Request, now: float) -> RequestPhases:
    queue = max(0.0, req.first_scheduled_at - req.arrival_time) if req.first_scheduled_at else 0.0
    prefill = max(0.0, req.first_token_at - req.first_scheduled_at) if req.first_scheduled_at else 0.0
    decode = max(0.0, now - req.first_token_at - req.transfer_seconds)
    return RequestPhases(queue, prefill, req.transfer_seconds, decode, disaggregated=req.transfer_seconds > 0,
                         num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens)
