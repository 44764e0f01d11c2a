"""One chaos run: under a steady streaming load, fault random stages one after another and check
the invariants after each fault and at the end.

Faults: `kill` (SIGKILL; the launcher respawns tokenizers and detokenizers, and workers with
--restart-workers) and `pause` (SIGSTOP for `pause_seconds`, past the liveness timeout, then
SIGCONT: the stage is declared gone and must rejoin). Invariants: every request in flight at a
fault ends within `deadline` seconds; every stream ends in words (finished, or an error event,
then [DONE]; or an error status), never a bare cut; every finished stream has exactly the
tokens of an undisturbed run (greedy, same prompt); the stack is whole again (/health "ok");
at the end no KV block is held and every KV integrity check passed.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

from pdserve.chaos.client import StreamLoad, StreamOutcome, metric, read_stream, wait_for
from pdserve.stack_processes import stage_pids

BODY = {"messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 12,
        "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
STAGES = ("tokenizer", "detokenizer", "worker")
ACTIONS = ("kill", "pause")


@dataclass
class EventRecord:
    stage: str
    action: str
    affected: int = 0  # requests in flight at the fault
    errored: int = 0  # of those, ended with an error
    last_end_s: float = 0.0  # fault -> the last of them ended
    serving_s: float | None = None  # fault -> the first request started after it finished
    whole_s: float | None = None  # fault -> /health "ok" again (a killed stage: replaced and registered)
    violations: list[str] = field(default_factory=list)


@dataclass
class ChaosReport:
    events: list[EventRecord]
    requests: int
    finished: int
    errored: int
    violations: list[str]

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2) \
                if len(values) > 1 else round(values[0], 2)

        serving = [e.serving_s for e in self.events if e.serving_s is not None]
        whole = [e.whole_s for e in self.events if e.whole_s is not None]
        last = [e.last_end_s for e in self.events]
        return {
            "events": len(self.events), "events_survived": sum(1 for e in self.events if not e.violations),
            "requests": self.requests, "finished": self.finished, "errored": self.errored,
            "requests_affected": sum(e.affected for e in self.events),
            "affected_errored": sum(e.errored for e in self.events),
            "affected_end_s": {"p50": pct(last, 50), "p99": pct(last, 99)},
            "serving_again_s": {"p50": pct(serving, 50), "p99": pct(serving, 99)},
            "whole_again_s": {"p50": pct(whole, 50), "p99": pct(whole, 99)},
            "violations": self.violations,
            "by_event": [asdict(e) for e in self.events],
        }


class ChaosRun:
    def __init__(self, url: str, pids: Callable[[], list[int]], *, seed: int = 0, concurrency: int = 4,
                 pause_seconds: float = 5.0, deadline: float = 15.0, recovery_timeout: float = 120.0,
                 liveness_timeout: float = 3.0,
                 stages: tuple[str, ...] = STAGES, actions: tuple[str, ...] = ACTIONS,
                 log: Callable[[str], None] = print) -> None:
        self.url, self.pids = url, pids
        self.rng = random.Random(seed)
        self.concurrency, self.pause_seconds, self.deadline = concurrency, pause_seconds, deadline
        self.recovery_timeout, self.liveness_timeout = recovery_timeout, liveness_timeout
        self.stages, self.actions, self.log = stages, actions, log

    def health(self) -> dict:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()
        except httpx.HTTPError as exc:
            return {"status": f"unreachable ({exc})"}

    def run(self, num_events: int) -> ChaosReport:
        reference = StreamOutcome()
        read_stream(self.url, BODY, reference)
        if not (reference.clean and reference.finish_reason):
            raise RuntimeError(f"the stack does not serve before any fault: {reference}")
        load = StreamLoad(self.url, BODY, self.concurrency).start()
        events: list[EventRecord] = []
        try:
            for _ in range(num_events):
                done = sum(1 for o in load.outcomes if o.finish_reason)  # serving before each fault
                wait_for(lambda: sum(1 for o in load.outcomes if o.finish_reason) >= done + 2, self.recovery_timeout)
                events.append(self._fault(load, self.rng.choice(self.stages), self.rng.choice(self.actions)))
        finally:
            load.stop()
        return self._report(events, load, reference)

    def _fault(self, load: StreamLoad, stage: str, action: str) -> EventRecord:
        rec = EventRecord(stage, action)
        candidates = stage_pids(self.pids(), stage)
        if not candidates:
            rec.violations.append(f"no live {stage} to fault")
            return rec
        pid = self.rng.choice(candidates)
        moment = time.monotonic()
        os.kill(pid, signal.SIGKILL if action == "kill" else signal.SIGSTOP)
        if action == "pause":
            time.sleep(self.pause_seconds)
            os.kill(pid, signal.SIGCONT)
        affected = load.in_flight_at(moment)
        if not wait_for(lambda: all(o.ended_at is not None for o in affected), self.deadline + 5):
            rec.violations.append(f"a request hangs past {self.deadline + 5:.0f} s")
        ends = [o.ended_at - moment for o in affected if o.ended_at is not None]
        rec.affected, rec.errored = len(affected), sum(1 for o in affected if o.errors or o.status != 200)
        rec.last_end_s = round(max(ends, default=0.0), 2)
        if rec.last_end_s > self.deadline:
            rec.violations.append(f"a request in flight ended {rec.last_end_s} s after the fault")
        def whole() -> bool:
            if action == "kill":  # its stale heartbeats and registration must have expired first,
                # and a respawned process taken its place
                if time.monotonic() - moment <= self.liveness_timeout:
                    return False
                if len(stage_pids(self.pids(), stage)) < len(candidates):
                    return False
            return self.health().get("status") == "ok"

        if wait_for(whole, self.recovery_timeout, interval=0.1):
            rec.whole_s = round(time.monotonic() - moment, 2)
        else:
            rec.violations.append(f"not whole again after {self.recovery_timeout:.0f} s: {self.health()}")
        wait_for(lambda: any(o.finish_reason and o.started_at > moment for o in load.outcomes),
                 self.recovery_timeout)
        served = [o.ended_at - moment for o in load.outcomes
                  if o.finish_reason and o.started_at > moment and o.ended_at is not None]
        rec.serving_s = round(min(served), 2) if served else None
        if rec.serving_s is None:
            rec.violations.append("no request finished after the fault")
        self.log(f"{stage} {action} (pid {pid}): {rec.affected} in flight, {rec.errored} ended with an "
                 f"error, last {rec.last_end_s} s after; serving again {rec.serving_s} s, whole again "
                 f"{rec.whole_s} s{'; ' + '; '.join(rec.violations) if rec.violations else ''}")
        return rec

    def _report(self, events: list[EventRecord], load: StreamLoad, reference: StreamOutcome) -> ChaosReport:
        violations = [f"{e.stage} {e.action}: {v}" for e in events for v in e.violations]
        for o in load.outcomes:
            if o.ended_at is None:
                violations.append(f"a request never ended: {o}")
            elif not o.clean:
                violations.append(f"a stream was cut or ended without a word: {o}")
            elif o.finish_reason and (o.completion_tokens != reference.completion_tokens or o.text != reference.text):
                violations.append(f"a finished stream lost or repeated tokens: {o.text!r} != {reference.text!r}")
        if not wait_for(lambda: metric(self.url, "pdserve:kv_cache_usage_perc") == 0.0, 30):
            violations.append("KV blocks still held after the load stopped")
        failures = metric(self.url, "pdserve:kv_integrity_failures_total")
        if failures:
            violations.append(f"{failures:.0f} KV integrity checks failed")
        return ChaosReport(events, len(load.outcomes), sum(1 for o in load.outcomes if o.finish_reason),
                           sum(1 for o in load.outcomes if o.errors), violations)
