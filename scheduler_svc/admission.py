"""How much waiting the stack admits, and which queued requests waited too long.

The waiting bound is stack-wide (not per worker, so it does not grow with workers that are not
there): `--max-waiting-requests`, or by default one full batch per ready worker, that is
min(max_num_seqs, its KV blocks) summed, since a running sequence holds at least one block. The
scheduler publishes the bound and the batch capacity in its stats, and the gateway refuses at the
door (429) from them; the scheduler's own check here is the exact one behind it.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.config import SchedulerSettings
from scheduler_svc.request import Request
from scheduler_svc.worker_slot import WorkerSlot


def batch_capacity(settings: SchedulerSettings, slots: Iterable[WorkerSlot]) -> int:
    """Sequences the ready workers can run at once."""
    return sum(min(settings.max_num_seqs, s.kv.num_usable_blocks) for s in slots if s.is_ready)


def waiting_bound(settings: SchedulerSettings, slots: Iterable[WorkerSlot]) -> int:
    """The stack-wide bound of waiting requests (at least 1)."""
    if settings.max_waiting_requests is not None:
        return settings.max_waiting_requests
    return max(1, batch_capacity(settings, slots))


def num_waiting(slots: Iterable[WorkerSlot]) -> int:
    return sum(len(s.scheduler.waiting) for s in slots)


def num_waiting_for_slot(settings: SchedulerSettings, slots: Iterable[WorkerSlot]) -> int:
    """Queued requests that the ready workers' free batch slots cannot take: what the bound is
    about. A queued request with a free slot waits only for the next steps' prefill budget, so a
    burst as large as the free slots plus the bound is admitted (the gateway's door estimates
    the same from its own counts)."""
    slots = list(slots)
    free = sum(max(0, min(settings.max_num_seqs, s.kv.num_usable_blocks) - len(s.scheduler.running))
               for s in slots if s.is_ready)
    return max(0, num_waiting(slots) - free)


def queued_too_long(slots: Iterable[WorkerSlot], limit: float, now: float) -> list[Request]:
    """Requests never scheduled yet that arrived more than `limit` seconds before `now` (a
    preempted or migrated request has run before and is not counted as queued)."""
    return [r for s in slots for r in s.scheduler.waiting
            if not r.first_scheduled_at and now - r.arrival_time > limit]
