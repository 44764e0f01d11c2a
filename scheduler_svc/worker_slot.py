"""The central scheduler's view of one worker: its facts, state, block accounting and steps in flight.

Each worker gets its own KVCacheManager (sized by the blocks its Hello reported) and its own
WorkerScheduler (batching policy); the central scheduler (`central.py`) decides which worker a
request goes to and moves requests between workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from protocol.config import CacheSettings, SchedulerSettings
from protocol.messages import StepPlan, WorkerHello, WorkerInfo, WorkerRole
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.worker_scheduler import WorkerScheduler

READY, DRAINING, DEAD = "ready", "draining", "dead"


@dataclass
class WorkerSlot:
    hello: WorkerHello
    identity: bytes
    kv: KVCacheManager
    scheduler: WorkerScheduler
    last_seen: float
    state: str = READY  # READY | DRAINING | DEAD
    max_inflight: int = 1
    inflight: deque[StepPlan] = field(default_factory=deque)  # sent, result not back; oldest first
    num_steps: int = 0
    busy_seconds: float = 0.0
    gpu_seconds: float = 0.0
    gpu_gap_seconds: float = 0.0
    drain_deadline: float = 0.0  # monotonic; while DRAINING, when what is left is moved away
    transfers_in: int = 0  # in flight, this worker the destination
    transfers_out: int = 0  # in flight, this worker the source
    transfers_done: int = 0
    transfer_bytes: int = 0
    transfers_by_transport: dict[str, int] = field(default_factory=dict)
    # A transfer into it passed its deadline without a word from it (stopped, hung, cut off) and
    # it has not been heard from since: new work goes elsewhere until it speaks or is declared dead.
    missed_transfer: bool = False

    @classmethod
    def create(
        cls, hello: WorkerHello, identity: bytes, sched: SchedulerSettings, cache: CacheSettings,
        now: float, seed: int, step_ids: Iterator[int] | None = None,
    ) -> WorkerSlot:
        kv = KVCacheManager(hello.num_kv_blocks, hello.block_size, cache.enable_prefix_caching)
        policy = WorkerScheduler(sched, kv, hello.max_model_len, hello.vocab_size, seed, step_ids)
        return cls(hello, identity, kv, policy, now, max_inflight=sched.max_inflight_steps)

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def role(self) -> WorkerRole:
        return self.hello.role

    @property
    def is_ready(self) -> bool:
        return self.state == READY

    @property
    def is_routable(self) -> bool:
        """Ready, and not silent since it missed a transfer: new requests and handoffs may go here."""
        return self.state == READY and not self.missed_transfer

    def heard_from(self, now_monotonic: float) -> None:
        """Any message from the worker: its liveness clock restarts and it takes new work again."""
        self.last_seen = now_monotonic
        self.missed_transfer = False

    @property
    def num_pending_tokens(self) -> int:
        """Tokens this worker must still compute for the requests it holds (prefill backlog)."""
        s = self.scheduler
        return sum(r.num_uncomputed_tokens for r in s.running) + sum(r.num_tokens for r in s.waiting)

    @property
    def num_seqs(self) -> int:
        s = self.scheduler
        return len(s.running) + len(s.waiting) + len(s.incoming)

    def info(self) -> WorkerInfo:
        h = self.hello
        return WorkerInfo(
            worker_id=h.worker_id, role=h.role, pid=h.pid, host=h.host, device=h.device,
            state=self.state, num_blocks_total=self.kv.num_usable_blocks,
            num_blocks_used=self.kv.num_usable_blocks - self.kv.num_free_blocks,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_steps=self.num_steps, busy_seconds=round(self.busy_seconds, 6),
            gpu_seconds=round(self.gpu_seconds, 6), gpu_gap_seconds=round(self.gpu_gap_seconds, 6),
            transfers_in=self.transfers_in, transfers_out=self.transfers_out,
            transfers_done=self.transfers_done, transfer_bytes=self.transfer_bytes,
            transports=list(h.transports), transfers_by_transport=dict(self.transfers_by_transport),
        )

    def next_plan(self, pipeline: bool) -> StepPlan | None:
        """The next step to send, or None when there is nothing to do or enough is in flight.

        With `pipeline`, up to max_inflight steps may be queued at the worker (it feeds its own
        samples forward, so step N+1 can be planned before N's result is back). Without it (a
        request arrived), a plan goes out only to an idle worker: arrivals during a step then
        wait for its result and join one larger step instead of a string of small ones.
        """
        limit = self.max_inflight if pipeline else 1
        if self.state == DEAD or len(self.inflight) >= limit:
            return None
        if not (self.scheduler.has_unfinished or self.scheduler.has_pending_forgets):
            return None
        plan = self.scheduler.schedule()
        if not (plan.new_seqs or plan.cached_seqs or plan.finished_request_ids):
            return None
        self.inflight.append(plan)
        return plan

    def complete(self, step_id: int) -> StepPlan | None:
        """Take the in-flight plan with this id off the queue (None if it is not there)."""
        for plan in self.inflight:
            if plan.step_id == step_id:
                self.inflight.remove(plan)
                return plan
        return None
