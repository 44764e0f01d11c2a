"""KV handoffs between workers: ordering transfers, completing them, releasing them on failure.

Part of CentralScheduler (which inherits it), kept apart so the scheduler's other duties read
on their own. A request's handoff copies its KV from the prefill worker to one decode worker in
one or more parts (one KVPull each). A long prompt prefilled in several chunks starts moving
early: once a chunk's step has completed, its full blocks are ordered while the next chunk runs,
so only the tail is left when the first token is sampled. A prompt prefilled in one step (or one
whose early reservation did not fit) waits in `pending_handoffs` until its first token, then a
decode worker reserves blocks for what it lacks and gets one KVPull. When every part is done the
decode side activates the request and the prefill side's blocks go to its prefix cache; a failure
that a zmq retry cannot fix ends the handoff on both sides (and recomputes an already prefilled
request elsewhere).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.messages import KVCancel, KVPull, KVPullDone, StepPlan, TransferRecord
from scheduler_svc.effects import Effects
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.routing import decode_ranking, decode_targets
from scheduler_svc.worker_slot import DEAD, WorkerSlot

if TYPE_CHECKING:
    from protocol.config import SchedulerSettings


@dataclass
class Handoff:
    """One request's move from `src` to `dst`: blocks [first, sent_upto) of its table ordered so
    far (those before `first` are cached on `dst`), `final` once the last part is ordered."""

    request: Request
    src: WorkerSlot
    dst: WorkerSlot
    first: int
    sent_upto: int
    started: float
    final: bool = False
    parts: set[int] = field(default_factory=set)  # transfer ids in flight


@dataclass
class Transfer:
    """One KVPull of a handoff."""

    transfer_id: int
    handoff: Handoff
    src_block_ids: list[int]
    dst_block_ids: list[int]
    transport: str
    started: float
    deadline: float

    @property
    def src(self) -> WorkerSlot:
        return self.handoff.src

    @property
    def dst(self) -> WorkerSlot:
        return self.handoff.dst

    @property
    def request(self) -> Request:
        return self.handoff.request


class KVHandoffs:
    """Mixin of CentralScheduler: the attributes below are CentralScheduler's, as are _migrate,
    _hashes and _finish_drains."""

    sched: SchedulerSettings
    workers: dict[str, WorkerSlot]
    where: dict[str, WorkerSlot]
    transfers: dict[int, Transfer]
    handoffs: dict[str, Handoff]
    pending_handoffs: list[tuple[WorkerSlot, Request]]
    no_cuda_ipc: set[tuple[str, str]]
    finished_transfers: list[TransferRecord]
    _transfer_ids: itertools.count

    # ------------------------------------------------------------------ starting

    def _prefilled(self, slot: WorkerSlot, reqs: list[Request], now: float, effects: Effects) -> None:
        """Requests whose first token just came back on a prefill worker: send the rest of an
        early handoff, or queue a new one."""
        for req in reqs:
            h = self.handoffs.get(req.request_id)
            if h is None:
                self.pending_handoffs.append((slot, req))
                continue
            h.final = True
            self._order_part(h, self._kv_blocks(h.src, req.num_tokens - 1), now, effects)
            if not h.parts:
                self._complete_handoff(h, now, effects)

    def _early_parts(self, slot: WorkerSlot, plan: StepPlan | None, now: float, effects: Effects) -> None:
        """A completed step wrote prompt chunks: order the full blocks of prefill-only requests
        that have more chunks to go, reserving a decode worker at the first such chunk."""
        if plan is None:
            return
        for seq in [*plan.new_seqs, *plan.cached_seqs]:
            req = slot.scheduler.requests.get(seq.request_id)
            if req is None or not req.prefill_only or req.status != RequestStatus.RUNNING:
                continue
            written = seq.num_computed_tokens + seq.num_scheduled_tokens
            if written >= req.num_tokens:
                continue  # the last chunk: the sample brings the final part (_prefilled)
            h = self.handoffs.get(req.request_id)
            if h is None:
                h = self._reserve(slot, req, req.num_tokens, now)
                if h is None:
                    continue  # no room yet: the whole prompt goes after the first token
            self._order_part(h, written // slot.kv.block_size, now, effects)

    def _start_handoffs(self, now: float, effects: Effects) -> None:
        """Find decode workers for prefilled requests without one and order their KV transfers."""
        waiting = []
        for src, req in self.pending_handoffs:
            rid = req.request_id
            if src.scheduler.outgoing.get(rid) is not req:
                continue  # aborted meanwhile
            if not decode_targets([s for s in self.workers.values() if s is not src]):
                src.scheduler.release_outgoing(rid)  # nowhere to decode: recompute where it can
                self._migrate(req, "no decode worker is ready", now, effects, counts=False, fallback=src)
                effects.plan(src)
                continue
            h = self._reserve(src, req, req.num_tokens - 1, now)
            if h is None:
                waiting.append((src, req))  # retried when blocks or sequence slots free up
                continue
            h.final = True
            self._order_part(h, self._kv_blocks(src, req.num_tokens - 1), now, effects)
            if not h.parts:  # the destination caches the whole prefix: nothing to copy
                self._complete_handoff(h, now, effects)
        self.pending_handoffs = waiting

    def _reserve(self, src: WorkerSlot, req: Request, num_kv: int, now: float) -> Handoff | None:
        workers = [s for s in self.workers.values() if s is not src]
        for dst in decode_ranking(workers, self._hashes(req.token_ids), num_kv):
            first = dst.scheduler.reserve_incoming(req, num_kv)
            if first is not None:
                h = Handoff(req, src, dst, first, first, now)
                self.handoffs[req.request_id] = h
                return h
        return None

    def _kv_blocks(self, slot: WorkerSlot, num_kv: int) -> int:
        return -(-num_kv // slot.kv.block_size)

    def _order_part(self, h: Handoff, end: int, now: float, effects: Effects) -> None:
        """One KVPull for table blocks [h.sent_upto, end), if there are any."""
        rid = h.request.request_id
        src_ids = h.src.kv.block_ids(rid)[h.sent_upto : end]
        dst_ids = h.dst.kv.block_ids(rid)[h.sent_upto : end]
        if not src_ids:
            return
        assert len(src_ids) == len(dst_ids), f"{rid}: source and destination tables differ"
        t = Transfer(next(self._transfer_ids), h, src_ids, dst_ids, self._transport(h.src, h.dst), now,
                     now + self.sched.kv_transfer_timeout + 1.0)
        h.sent_upto = end
        self._send(t, effects)

    def _send(self, t: Transfer, effects: Effects) -> None:
        self.transfers[t.transfer_id] = t
        t.handoff.parts.add(t.transfer_id)
        t.src.transfers_out += 1
        t.dst.transfers_in += 1
        effects.messages.append((t.dst, KVPull(
            t.transfer_id, t.request.request_id, t.src.worker_id, t.src.hello.kv_address,
            t.src_block_ids, t.dst_block_ids, t.transport, self.sched.kv_transfer_timeout)))

    def _transport(self, src: WorkerSlot, dst: WorkerSlot) -> str:
        """cuda-ipc between CUDA workers of one host unless it failed for this pair; else zmq."""
        same_node = src.hello.node_id and src.hello.node_id == dst.hello.node_id
        both = "cuda-ipc" in src.hello.transports and "cuda-ipc" in dst.hello.transports
        if same_node and both and (src.worker_id, dst.worker_id) not in self.no_cuda_ipc:
            return "cuda-ipc"
        return "zmq"

    # ------------------------------------------------------------------ ending

    def on_pull_done(self, msg: KVPullDone, now: float) -> Effects:
        effects = Effects()
        t = self.transfers.pop(msg.transfer_id, None)
        if t is None:
            return effects  # cancelled or timed out already
        self._unlink(t)
        h = t.handoff
        self.finished_transfers.append(TransferRecord(t.transport, msg.num_bytes,
                                                      msg.seconds or now - t.started, msg.ok))
        if msg.ok:
            t.dst.transfers_done += 1
            t.dst.transfer_bytes += msg.num_bytes
            by = t.dst.transfers_by_transport
            by[t.transport] = by.get(t.transport, 0) + 1
            if h.final and not h.parts:
                self._complete_handoff(h, now, effects)
        elif t.transport == "cuda-ipc":  # same blocks, the portable path
            self.no_cuda_ipc.add((t.src.worker_id, t.dst.worker_id))
            t.transfer_id, t.transport = next(self._transfer_ids), "zmq"
            t.started, t.deadline = now, now + self.sched.kv_transfer_timeout + 1.0
            self._send(t, effects)
        else:
            self._end_handoff(h, f"KV transfer failed ({msg.error})", now, effects)
        self._finish_drains(effects)
        return effects

    def _complete_handoff(self, h: Handoff, now: float, effects: Effects) -> None:
        rid = h.request.request_id
        del self.handoffs[rid]
        h.request.transfer_seconds += now - h.started
        h.src.scheduler.release_outgoing(rid)
        h.dst.scheduler.activate_incoming(rid)
        self.where[rid] = h.dst
        effects.plan(h.src)
        effects.plan(h.dst)

    def _end_handoff(self, h: Handoff, why: str, now: float, effects: Effects, release_src: bool = True,
                     fault: bool = True) -> None:
        """Stop a handoff on both sides: parts in flight are cancelled (a live destination never
        writes them again), the reservation is released. A request already prefilled is
        released by its source and recomputed elsewhere (unless `release_src` is off: the
        caller ends it there); one still prefilling simply stays where it is (and is handed
        off again after its first token). `fault`: the handoff ends because something failed
        (a worker, a deadline), so each part still in flight counts as a failed transfer; off
        when the request itself went away (aborted, finished early)."""
        rid = h.request.request_id
        self.handoffs.pop(rid, None)
        for tid in list(h.parts):
            t = self.transfers.pop(tid)
            self._unlink(t)
            if fault:
                self.finished_transfers.append(TransferRecord(t.transport, 0, now - t.started, False))
            if h.dst.state != DEAD:
                effects.messages.append((h.dst, KVCancel(tid)))
        if rid in h.dst.scheduler.incoming:
            h.dst.scheduler.cancel_incoming(rid)
            effects.plan(h.dst)
        if release_src and rid in h.src.scheduler.outgoing:
            h.src.scheduler.release_outgoing(rid)
            effects.plan(h.src)
            self._migrate(h.request, why, now, effects)

    def _end_stale_early_handoffs(self, slot: WorkerSlot, now: float, effects: Effects) -> None:
        """An early handoff whose request left its source's running queue (preempted, aborted,
        finished at its first token) before being prefilled: its source blocks are gone."""
        for h in [h for h in self.handoffs.values() if h.src is slot and not h.final]:
            if h.request.status != RequestStatus.RUNNING or h.request.request_id not in slot.scheduler.requests:
                self._end_handoff(h, "the request left the prefill worker", now, effects, release_src=False,
                                  fault=False)

    def _unlink(self, t: Transfer) -> None:
        t.handoff.parts.discard(t.transfer_id)
        t.src.transfers_out -= 1
        t.dst.transfers_in -= 1
