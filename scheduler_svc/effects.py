"""What the scheduler process must do after an event, as decided by the pure central scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.messages import RequestOutput, ToWorker
from scheduler_svc.worker_slot import WorkerSlot


@dataclass
class Effects:
    """What the process shell must do after an event, in this order: messages, plans, outputs."""

    outputs: list[RequestOutput] = field(default_factory=list)
    messages: list[tuple[WorkerSlot, ToWorker]] = field(default_factory=list)
    kick: dict[str, WorkerSlot] = field(default_factory=dict)  # workers to top up with plans

    def plan(self, slot: WorkerSlot) -> None:
        self.kick[slot.worker_id] = slot
