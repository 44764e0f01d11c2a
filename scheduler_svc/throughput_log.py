"""The scheduler's periodic throughput line, as vLLM's and SGLang's servers log one.

Every --log-stats-interval seconds while there is work (and once more when it stops), one INFO
line says what the model workers did since the previous line: steps, tokens computed (prompt
tokens and the decode steps' inputs), tokens generated, how busy the workers were, and how full
the stack is. It is what an operator watches in `docker compose logs`, and with a 1 s interval
it is a timeline of a benchmark run (when the first step ran, when the load drained).
"""

from __future__ import annotations

import msgspec


class WorkTotals(msgspec.Struct, frozen=True):
    """Counts since the scheduler started, summed over every worker it has known."""

    steps: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0


class ThroughputLog:
    """Turns the running totals into one line per interval (no sockets, no clock of its own)."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self._since = now
        self._last = WorkTotals()
        self._was_active = False

    def line(self, now: float, totals: WorkTotals, running: int, waiting: int, kv_usage: float,
             ready_workers: int) -> str | None:
        """The line to log at `now`, or None: off (interval 0), not yet due, or idle with the
        previous line already saying so."""
        elapsed = now - self._since
        if self.interval <= 0 or elapsed < self.interval:
            return None
        steps = totals.steps - self._last.steps
        active = steps > 0 or running > 0 or waiting > 0
        if not active and not self._was_active:
            self._since, self._last = now, totals
            return None
        computed = totals.computed_tokens - self._last.computed_tokens
        generated = totals.generated_tokens - self._last.generated_tokens
        busy = totals.busy_seconds - self._last.busy_seconds
        self._since, self._last, self._was_active = now, totals, active
        # a step is counted in the interval it ends in, so a share can pass 1 by a step's length
        busy_share = min(1.0, busy / (elapsed * ready_workers)) if ready_workers else 0.0
        return (f"{steps / elapsed:.1f} steps/s, computed {computed / elapsed:.0f} tok/s, "
                f"generated {generated / elapsed:.0f} tok/s, workers busy {100 * busy_share:.0f}% "
                f"({ready_workers} ready), running {running}, waiting {waiting}, "
                f"KV cache {100 * kv_usage:.1f}%")
