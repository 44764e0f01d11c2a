"""KV handoffs between workers: ordering transfers, completing them, releasing them on failure.

Part of CentralScheduler (which inherits it), kept apart so the scheduler's other duties read
on their own. A prefilled request waits in `pending_handoffs` until a decode worker can reserve
blocks for the KV it lacks; then one KVPull goes to that worker, and its KVPullDone either
activates the request there (the prefill side's blocks go to its prefix cache) or, after a
failure that a zmq retry cannot fix, releases both sides and recomputes the request elsewhere.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.messages import KVCancel, KVPull, KVPullDone, TransferRecord
from scheduler_svc.request import Request
from scheduler_svc.routing import decode_ranking, decode_targets
from scheduler_svc.worker_slot import DEAD, WorkerSlot

from scheduler_svc.effects import Effects

if TYPE_CHECKING:
    from protocol.config import SchedulerSettings


@dataclass
class Transfer:
    transfer_id: int
    request: Request
    src: WorkerSlot
    dst: WorkerSlot
    src_block_ids: list[int]
    dst_block_ids: list[int]
    transport: str
    started: float
    deadline: float


class KVHandoffs:
    """Mixin of CentralScheduler: the attributes below are CentralScheduler's, as are _migrate,
    _hashes and _finish_drains."""

    sched: SchedulerSettings
    workers: dict[str, WorkerSlot]
    where: dict[str, WorkerSlot]
    transfers: dict[int, Transfer]
    transfer_of: dict[str, int]
    pending_handoffs: list[tuple[WorkerSlot, Request]]
    no_cuda_ipc: set[tuple[str, str]]
    finished_transfers: list[TransferRecord]
    _transfer_ids: itertools.count

    def _start_handoffs(self, now: float, effects: Effects) -> None:
        """Find decode workers for prefilled requests and order their KV transfers."""
        waiting = []
        for src, req in self.pending_handoffs:
            rid = req.request_id
            if src.scheduler.outgoing.get(rid) is not req:
                continue  # aborted meanwhile
            workers = [s for s in self.workers.values() if s is not src]
            if not decode_targets(workers):
                src.scheduler.release_outgoing(rid)  # nowhere to decode: recompute where it can
                self._migrate(req, "no decode worker is ready", now, effects, counts=False)
                effects.plan(src)
                continue
            reserved = None
            for dst in decode_ranking(workers, self._hashes(req.token_ids), req.num_tokens - 1):
                reserved = dst.scheduler.reserve_incoming(req)
                if reserved is not None:
                    break
            if reserved is None:
                waiting.append((src, req))  # retried when blocks or sequence slots free up
                continue
            first, dst_ids = reserved
            src_ids = src.kv.block_ids(rid)[first : first + len(dst_ids)]
            if not dst_ids:  # the destination caches the whole prefix: nothing to copy
                self._complete_handoff(src, dst, req, effects)
                continue
            tid = next(self._transfer_ids)
            t = Transfer(tid, req, src, dst, src_ids, dst_ids, self._transport(src, dst), now,
                         now + self.sched.kv_transfer_timeout + 1.0)
            self.transfers[tid] = t
            self.transfer_of[rid] = tid
            src.transfers_out += 1
            dst.transfers_in += 1
            effects.messages.append((dst, self._pull_order(t)))
        self.pending_handoffs = waiting

    def _pull_order(self, t: Transfer) -> KVPull:
        return KVPull(t.transfer_id, t.request.request_id, t.src.worker_id, t.src.hello.kv_address,
                      t.src_block_ids, t.dst_block_ids, t.transport, self.sched.kv_transfer_timeout)

    def _transport(self, src: WorkerSlot, dst: WorkerSlot) -> str:
        """cuda-ipc between CUDA workers of one host unless it failed for this pair; else zmq."""
        same_node = src.hello.node_id and src.hello.node_id == dst.hello.node_id
        both = "cuda-ipc" in src.hello.transports and "cuda-ipc" in dst.hello.transports
        if same_node and both and (src.worker_id, dst.worker_id) not in self.no_cuda_ipc:
            return "cuda-ipc"
        return "zmq"

    def on_pull_done(self, msg: KVPullDone, now: float) -> Effects:
        effects = Effects()
        t = self.transfers.get(msg.transfer_id)
        if t is None:
            return effects  # cancelled or timed out already
        self.finished_transfers.append(TransferRecord(t.transport, msg.num_bytes,
                                                      msg.seconds or now - t.started, msg.ok))
        if msg.ok:
            del self.transfers[msg.transfer_id]
            self._unlink(t)
            t.request.transfer_seconds += now - t.started
            t.dst.transfers_done += 1
            t.dst.transfer_bytes += msg.num_bytes
            self._complete_handoff(t.src, t.dst, t.request, effects)
        elif t.transport == "cuda-ipc":  # same blocks, the portable path
            self.no_cuda_ipc.add((t.src.worker_id, t.dst.worker_id))
            del self.transfers[msg.transfer_id]
            t.transfer_id, t.transport = next(self._transfer_ids), "zmq"
            t.deadline = now + self.sched.kv_transfer_timeout + 1.0
            self.transfers[t.transfer_id] = t
            self.transfer_of[t.request.request_id] = t.transfer_id
            effects.messages.append((t.dst, self._pull_order(t)))
        else:
            self._end_transfer(t, effects, f"KV transfer failed ({msg.error})", now)
        self._finish_drains(effects)
        return effects

    def _complete_handoff(self, src: WorkerSlot, dst: WorkerSlot, req: Request, effects: Effects) -> None:
        rid = req.request_id
        src.scheduler.release_outgoing(rid)
        dst.scheduler.activate_incoming(rid)
        self.where[rid] = dst
        effects.plan(src)
        effects.plan(dst)

    def _end_transfer(self, t: Transfer, effects: Effects, why: str, now: float) -> None:
        """Release both sides of a transfer that will not complete and recompute its request.

        A live destination is told to stop (KVCancel), so it never writes the blocks again."""
        self.transfers.pop(t.transfer_id, None)
        self._unlink(t)
        rid = t.request.request_id
        if rid in t.dst.scheduler.incoming:
            if t.dst.state != DEAD:
                effects.messages.append((t.dst, KVCancel(t.transfer_id)))
            t.dst.scheduler.cancel_incoming(rid)
            effects.plan(t.dst)
        if rid in t.src.scheduler.outgoing:
            t.src.scheduler.release_outgoing(rid)
            effects.plan(t.src)
        self._migrate(t.request, why, now, effects)

    def _unlink(self, t: Transfer) -> None:
        self.transfer_of.pop(t.request.request_id, None)
        t.src.transfers_out -= 1
        t.dst.transfers_in -= 1
