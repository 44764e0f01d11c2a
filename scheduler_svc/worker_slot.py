"""The scheduler process's view of one worker: its block accounting, its queue, its step in flight.

Each worker gets its own KVCacheManager (sized by the blocks its Hello reported) and its own
Scheduler policy instance; the service routes a new request to the least-loaded ready worker,
and a request stays on that worker until it ends (moving it is the disaggregation issue's).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocol.config import CacheSettings, SchedulerSettings
from protocol.messages import StepPlan, WorkerHello, WorkerInfo
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.scheduler import Scheduler


@dataclass
class WorkerSlot:
    hello: WorkerHello
    identity: bytes
    kv: KVCacheManager
    scheduler: Scheduler
    last_seen: float
    state: str = "ready"  # "ready" | "dead"
    max_inflight: int = 1
    inflight: deque[StepPlan] = field(default_factory=deque)  # sent, result not back; oldest first
    first_scheduled: dict[str, float] = field(default_factory=dict)
    num_steps: int = 0
    busy_seconds: float = 0.0

    @classmethod
    def create(
        cls, hello: WorkerHello, identity: bytes, sched: SchedulerSettings, cache: CacheSettings,
        now: float, seed: int,
    ) -> WorkerSlot:
        kv = KVCacheManager(hello.num_kv_blocks, hello.block_size, cache.enable_prefix_caching)
        policy = Scheduler(sched, kv, hello.max_model_len, hello.vocab_size, seed)
        return cls(hello, identity, kv, policy, now, max_inflight=sched.max_inflight_steps)

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def load(self) -> tuple[int, float]:
        """Smaller is less loaded: queued requests first, then KV usage."""
        return len(self.scheduler.running) + len(self.scheduler.waiting), self.kv.usage

    def info(self) -> WorkerInfo:
        h = self.hello
        return WorkerInfo(
            worker_id=h.worker_id, role=h.role, pid=h.pid, host=h.host, device=h.device,
            state=self.state, num_blocks_total=self.kv.num_usable_blocks,
            num_blocks_used=self.kv.num_usable_blocks - self.kv.num_free_blocks,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_steps=self.num_steps, busy_seconds=round(self.busy_seconds, 6),
        )

    def next_plan(self, pipeline: bool) -> StepPlan | None:
        """The next step to send, or None when there is nothing to do or enough is in flight.

        With `pipeline`, up to max_inflight steps may be queued at the worker (it feeds its own
        samples forward, so step N+1 can be planned before N's result is back). Without it (a
        request arrived), a plan goes out only to an idle worker: arrivals during a step then
        wait for its result and join one larger step instead of a string of small ones.
        """
        limit = self.max_inflight if pipeline else 1
        if self.state != "ready" or len(self.inflight) >= limit:
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


def least_loaded(slots: list[WorkerSlot]) -> WorkerSlot | None:
    ready = [s for s in slots if s.state == "ready"]
    return min(ready, key=lambda s: s.load) if ready else None
