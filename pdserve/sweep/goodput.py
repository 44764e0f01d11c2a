"""SLO attainment, goodput and the recommended layout: the arithmetic of `pdserve sweep`.

A request meets the SLOs when it succeeded and its TTFT, TPOT and (largest) inter-token gap are
within the limits given. A load point's attainment is the share of its requests that meet them.
A layout's goodput is DistServe's: the highest load (request rate or concurrency) at which the
attainment reaches the target share (default 90%), divided by the layout's workers so layouts of
different sizes compare. With repetitions, a point's attainment is the mean over repetitions and
its spread (max - min) says how far to trust a difference between layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.client import RequestRecord
from pdserve.sweep.experiment import SLO


def meets(record: RequestRecord, slo: SLO) -> bool:
    if not record.success:
        return False
    checks = ((slo.ttft_ms, record.ttft), (slo.tpot_ms, record.tpot),
              (slo.itl_ms, max(record.itl) if record.itl else None))
    return all(value is None or limit is None or value * 1000.0 <= limit for limit, value in checks)


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """Share of the point's requests that met every SLO (failed and unsent ones count as missed)."""
    return sum(meets(r, slo) for r in records) / len(records) if records else 0.0


@dataclass(frozen=True)
class PointResult:
    layout: str
    kind: str  # "rate" | "concurrency"
    load: float
    attainments: tuple[float, ...]  # one per repetition

    @property
    def mean(self) -> float:
        return sum(self.attainments) / len(self.attainments)

    @property
    def spread(self) -> float:
        return max(self.attainments) - min(self.attainments)


@dataclass(frozen=True)
class LayoutGoodput:
    layout: str
    workers: int
    goodput: float  # highest load meeting the target, 0 if none does
    per_worker: float
    spread: float  # attainment spread at that point (0 with one repetition)


def layout_goodput(points: Sequence[PointResult], workers: int, target: float) -> LayoutGoodput:
    """DistServe goodput of one layout over its points of one kind (rates or concurrencies)."""
    if not points:
        raise ValueError("no points")
    passing = [p for p in points if p.mean >= target]
    best = max(passing, key=lambda p: p.load) if passing else None
    goodput = best.load if best else 0.0
    return LayoutGoodput(points[0].layout, workers, goodput, goodput / max(1, workers),
                         best.spread if best else 0.0)


def recommend(goodputs: Sequence[LayoutGoodput]) -> str:
    """One line naming the layout with the highest goodput per worker, and whether the lead is
    larger than the run-to-run spread (or no repetitions allow saying so)."""
    if not goodputs:
        return "no layout was measured"
    ranked = sorted(goodputs, key=lambda g: g.per_worker, reverse=True)
    best = ranked[0]
    if best.goodput == 0:
        return "no layout met the SLOs at any load point; relax the SLOs or lower the load"
    line = (f"recommended: {best.layout} ({best.goodput:g} at the SLOs with {best.workers} "
            f"worker(s), {best.per_worker:.3g} per worker)")
    if len(ranked) > 1:
        runner_up = ranked[1]
        if best.per_worker == runner_up.per_worker:
            line += f"; tied with {runner_up.layout}"
        elif best.spread > 0 or runner_up.spread > 0:
            line += (f"; its lead over {runner_up.layout} comes with an attainment spread of up to "
                     f"{max(best.spread, runner_up.spread):.0%} between repetitions")
        else:
            line += f"; next: {runner_up.layout} ({runner_up.per_worker:.3g} per worker), one repetition each"
    return line


def count_workers(flags: Sequence[str]) -> int:
    """Model workers a `pdserve up` flag list starts (mixed, prefill and decode; 1 by default)."""
    values: dict[str, int] = {}
    for i, flag in enumerate(flags):
        name, _, inline = flag.partition("=")
        if name in ("--workers", "--prefill-workers", "--decode-workers"):
            raw = inline or (flags[i + 1] if i + 1 < len(flags) else "")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{name} needs a number, got {raw!r}") from None
    roles = values.get("--prefill-workers", 0) + values.get("--decode-workers", 0)
    mixed = values.get("--workers", 0 if roles else 1)
    return mixed + roles
