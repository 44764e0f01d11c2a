"""Admission at the door: refuse (429) at once what would only wait past the stack's bound.

The gateway is the stack's one door, so its own counts are current where the scheduler's stats
are up to half a second old: choices not yet started (no output: in a tokenizer, queued, or
prefilling) and choices started (generating). With `capacity` sequences able to run at once,
at least `pending - (capacity - started)` of the pending ones are waiting; past the scheduler's
published bound (`SchedulerStats.max_waiting`) a new request is refused with a Retry-After
estimated from how fast requests are finishing. The scheduler keeps the exact check behind it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

RATE_WINDOW = 10.0  # seconds of finished requests the finish rate is measured over
MIN_RETRY, MAX_RETRY, DEFAULT_RETRY = 0.1, 60.0, 1.0  # seconds


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after: float  # seconds

    @property
    def headers(self) -> dict[str, str]:
        return retry_headers(self.retry_after)


def retry_headers(seconds: float) -> dict[str, str]:
    """`retry-after` in whole seconds (HTTP's unit, at least 1) and `retry-after-ms` (what the
    openai SDK reads first) in milliseconds."""
    return {"retry-after": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}


class DoorAdmission:
    """Pure: counts in, a Refusal or None out; the caller supplies the clock."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.finished: deque[float] = deque()  # when choices finished, oldest first

    def note_finished(self, now: float) -> None:
        self.finished.append(now)
        self._trim(now)

    def finish_rate(self, now: float) -> float:
        """Choices finished per second over the last `window` seconds."""
        self._trim(now)
        return len(self.finished) / self.window

    def retry_after(self, excess: int, now: float) -> float:
        """Seconds until `excess` more choices have likely finished (clamped)."""
        rate = self.finish_rate(now)
        seconds = excess / rate if rate > 0 else DEFAULT_RETRY
        return min(MAX_RETRY, max(MIN_RETRY, seconds))

    def check(self, pending: int, started: int, new: int, bound: int, capacity: int,
              now: float) -> Refusal | None:
        """None to admit `new` choices, else why not and when to come back. `bound` 0 means
        the scheduler has not published one yet (readiness answers that case)."""
        if bound <= 0:
            return None
        waiting = max(0, pending - max(0, capacity - started))
        if waiting == 0 or waiting + new <= bound:
            return None
        retry = self.retry_after(waiting + new - bound, now)
        return Refusal(f"server overloaded: about {waiting} requests are waiting for a batch slot "
                       f"(the bound is {bound}); retry after {retry:.2f} s", retry)

    def _trim(self, now: float) -> None:
        while self.finished and self.finished[0] < now - self.window:
            self.finished.popleft()
