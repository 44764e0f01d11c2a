"""The scheduler process's periodic upkeep, every STATS_INTERVAL: workers silent past the liveness
timeout are declared dead, transfers and queued requests past their limits expire, old memories
of ended and early-aborted requests are pruned, lost detokenizers are handled, integrity is
checked on its interval, SchedulerStats go to the gateway, and the throughput line is logged on
--log-stats-interval.

These methods are part of SchedulerService (which inherits them); they live here so the event
handlers in `scheduler_process.py` read on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from protocol.messages import FinishReason, SchedulerStats
from scheduler_svc.admission import batch_capacity, queued_too_long, waiting_bound
from scheduler_svc.service_timing import EARLY_ABORT_MEMORY, SEND_TIMEOUT, STATS_INTERVAL
from scheduler_svc.throughput_log import ThroughputLog
from scheduler_svc.worker_slot import DEAD, READY

if TYPE_CHECKING:
    from protocol.config import SchedulerSettings, StageSettings
    from protocol.sockets import PushSocket
    from scheduler_svc.central import CentralScheduler
    from scheduler_svc.detok_table import DetokTable

log = logging.getLogger("pdserve.scheduler")


class ServiceUpkeep:
    """Mixin of SchedulerService: the attributes below are SchedulerService's."""

    sched: SchedulerSettings
    stage: StageSettings
    central: CentralScheduler
    gateway: PushSocket
    detoks: DetokTable
    early_aborts: dict[str, float]
    ended: dict[str, float]
    unknown_replied: dict[bytes, float]
    integrity_failures: int
    throughput_log: ThroughputLog
    _last_integrity: float
    # and its methods _declare_dead, _apply, _abort, _fail, _detok_lost and _check_integrity

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            now = time.monotonic()
            for slot in list(self.central.workers.values()):
                if slot.state != DEAD and now - slot.last_seen > self.stage.liveness_timeout:
                    await self._declare_dead(slot, "stopped responding")
            effects = self.central.expire(time.time())
            await self._apply(effects, check=bool(effects.outputs or effects.messages))
            if self.sched.max_queue_time is not None:
                await self._expire_queued(self.sched.max_queue_time)
            for memory in (self.early_aborts, self.ended):
                for rid, when in list(memory.items()):
                    if now - when > EARLY_ABORT_MEMORY:
                        del memory[rid]
            self.detoks.prune(now)
            for identity, when in list(self.unknown_replied.items()):
                if now - when > 60.0:
                    del self.unknown_replied[identity]
            for detok in self.detoks.silent(now, self.stage.liveness_timeout):
                await self._detok_lost(detok)
            interval = self.sched.check_integrity_interval
            if interval > 0 and now - self._last_integrity >= interval:
                self._last_integrity = now
                self._check_integrity()
            self._log_throughput()
            await self.gateway.send_within(self.stats(), SEND_TIMEOUT)  # the next one follows

    def _log_throughput(self) -> None:
        c = self.central
        slots = list(c.workers.values())
        total = sum(s.kv.num_usable_blocks for s in slots)
        line = self.throughput_log.line(
            time.monotonic(), c.work, running=sum(len(s.scheduler.running) for s in slots),
            waiting=sum(len(s.scheduler.waiting) for s in slots),
            kv_usage=sum(s.kv.num_usable_blocks * s.kv.usage for s in slots) / total if total else 0.0,
            ready_workers=sum(1 for s in slots if s.state == READY))
        if line is not None:
            log.info("%s", line)

    async def _expire_queued(self, limit: float) -> None:
        """Fail requests that waited longer than --max-queue-time for their first step."""
        now = time.time()
        late = queued_too_long(self.central.workers.values(), limit, now)
        clients: dict[str, str] = {}
        for req in late:
            client = self.detoks.client(req.request_id)
            clients[client] = (f"the request waited {now - req.arrival_time:.1f} s in the queue, "
                               f"longer than --max-queue-time {limit:g} s; retry later")
        for client, message in clients.items():  # first, so the client sees this status
            await self._fail(client, 503, message, code="queue_timeout")
        if late:
            log.warning("%d request(s) waited longer than --max-queue-time %g s", len(late), limit)
            await self._abort([r.request_id for r in late], FinishReason.ERROR,
                              "waited longer than --max-queue-time")

    def _cache_info(self, slots: list) -> dict[str, str]:
        """The KV cache config in vLLM's `cache_config_info` label names."""
        cache = self.central.cache
        layout = next((s.hello.kv_layout for s in slots if s.hello.kv_layout is not None), None)
        return {
            "block_size": str(cache.block_size),
            "cache_dtype": layout.dtype if layout is not None else "auto",
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "gpu_memory_utilization": str(cache.memory_utilization),
            "num_gpu_blocks": str(sum(s.hello.num_kv_blocks for s in slots)),
            "num_cpu_blocks": "None",
        }

    def stats(self) -> SchedulerStats:
        c = self.central
        live = [s for s in c.workers.values() if s.state == READY]
        total = sum(s.kv.num_usable_blocks for s in c.workers.values())
        used = sum(s.kv.num_usable_blocks * s.kv.usage for s in c.workers.values())
        first = next(iter(c.workers.values()), None)
        transfers, c.finished_transfers = c.finished_transfers, []
        phases, c.finished_phases = c.finished_phases, []
        step_tokens, c.step_tokens = c.step_tokens, []
        slots = list(c.workers.values())
        return SchedulerStats(
            timestamp=time.time(),
            model=first.hello.model if first else "",
            max_model_len=min((s.hello.max_model_len for s in live), default=0),
            num_running=sum(len(s.scheduler.running) for s in slots),
            num_waiting=sum(len(s.scheduler.waiting) for s in slots),
            kv_cache_usage=used / total if total else 0.0,
            prefix_cache_queries=c.total("prefix_cache_queries"),
            prefix_cache_hits=c.total("prefix_cache_hits"),
            workers=c.infos(),
            transfers=transfers,
            phases=phases,
            num_migrations=c.num_migrations,
            num_preemptions=c.total("num_preemptions"),
            integrity_checks=c.integrity_checks,
            step_tokens=step_tokens,
            cache_info=self._cache_info(slots),
            integrity_failures=self.integrity_failures,
            max_waiting=waiting_bound(self.sched, slots),
            batch_capacity=batch_capacity(self.sched, slots),
        )
