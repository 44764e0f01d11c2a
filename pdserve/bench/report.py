"""Metrics from request records: throughput, latency percentiles, goodput; table, JSON and plot.

Latencies are reported in milliseconds, percentiles with numpy's linear interpolation. Goodput
counts successful requests that meet every given SLO (ttft, tpot and/or e2e, in ms; a one-token
output has no TPOT and so cannot miss a TPOT SLO), per second of the run and as a fraction of
all requests that were sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
SLO_METRICS = ("ttft", "tpot", "e2e")


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=500,tpot=50' -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item.strip()!r}: use name=ms with name in {', '.join(SLO_METRICS)}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item.strip()!r}: {value.strip()!r} is not a number") from None
        if not slo[name] > 0:
            raise ValueError(f"bad SLO {item.strip()!r}: the limit must be > 0 ms")
    return slo


def latency_values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """One metric in seconds over the successful records (ITL: every gap of every request)."""
    ok = [r for r in records if r.success]
    if metric == "itl":
        return [gap for r in ok for gap in r.itl]
    values = (getattr(r, metric) for r in ok)
    return [v for v in values if v is not None]


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, std, p50/p90/p99 in ms; all None when there is nothing to summarize."""
    keys = ["mean", "std", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {"mean": float(ms.mean()), "std": float(ms.std())}
    out.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.success:
        return False
    for name, limit_ms in slo.items():
        value = getattr(record, name)
        if value is not None and value * 1000.0 > limit_ms:
            return False
    return True


def summarize(records: Sequence[RequestRecord], duration: float, slo: dict[str, float],
              not_sent: int = 0) -> dict[str, Any]:
    """The whole run in one flat-ish dict (what the table prints and the JSON stores)."""
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "not_sent": not_sent,
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
    }
    for metric in LATENCY_METRICS:
        summary[f"{metric}_ms"] = distribution_ms(latency_values(records, metric))
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        summary["slo_ms"] = dict(slo)
        summary["goodput"] = per_s(good)
        summary["goodput_fraction"] = good / len(records) if records else 0.0
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A fixed-width text table, one metric per line."""
    rows: list[tuple[str, str]] = [
        ("Successful requests", str(summary["completed"])),
        ("Failed requests", str(summary["failed"])),
    ]
    if summary.get("not_sent"):
        rows.append(("Not sent (time limit)", str(summary["not_sent"])))
    rows += [
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", str(summary["total_input_tokens"])),
        ("Total generated tokens", str(summary["total_output_tokens"])),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    if "goodput" in summary:
        slo = ", ".join(f"{k}<={v:g}ms" for k, v in summary["slo_ms"].items())
        rows += [(f"Goodput (req/s) [{slo}]", f"{summary['goodput']:.2f}"),
                 ("Goodput fraction", f"{summary['goodput_fraction']:.1%}")]
    for metric in LATENCY_METRICS:
        dist = summary[f"{metric}_ms"]
        for key, value in dist.items():
            if key != "std":
                rows.append((f"{key.capitalize() if key == 'mean' else key.upper()} {metric.upper()} (ms)",
                             "n/a" if value is None else f"{value:.2f}"))
    if summary.get("server_phases"):
        from pdserve.bench.server_phases import format_rows

        rows += format_rows(summary["server_phases"])
    width = max(len(name) for name, _ in rows) + 2
    title = " Serving Benchmark Result "
    line = "=" * (width + 12)
    body = "\n".join(f"{name:<{width}}{value:>10}" for name, value in rows)
    return f"{title.center(width + 12, '=')}\n{body}\n{line}"


def write_json(path: Path, config: dict[str, Any], summary: dict[str, Any],
               records: Sequence[RequestRecord], bench_start: float) -> None:
    """config + summary + per-request records (start_time relative to the run's start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "summary": summary, "requests": [r.to_json(bench_start) for r in records]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def plot(path: Path, records: Sequence[RequestRecord], bench_start: float) -> None:
    """PNG: TTFT and TPOT histograms, their CDFs, and per-request latency over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft = np.asarray(latency_values(records, "ttft")) * 1000.0
    tpot = np.asarray(latency_values(records, "tpot")) * 1000.0
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, values, name in ((axes[0, 0], ttft, "TTFT"), (axes[0, 1], tpot, "TPOT")):
        if values.size:
            _histogram(ax, values)
        ax.set(title=f"{name} histogram", xlabel=f"{name} (ms)", ylabel="requests")
    ax = axes[1, 0]
    for values, name in ((ttft, "TTFT"), (tpot, "TPOT")):
        if values.size:
            xs = np.sort(values)
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=name)
    ax.set(title="CDF", xlabel="ms", ylabel="fraction of requests", xscale="log")
    if ttft.size or tpot.size:
        ax.legend(loc="lower right")
    ax = axes[1, 1]
    ok = [r for r in records if r.success]
    bad = [r for r in records if not r.success]
    starts = [r.start_time - bench_start for r in ok]
    ax.scatter(starts, [r.e2e * 1000.0 for r in ok], s=8, label="E2E")
    ax.scatter(starts, [r.ttft * 1000.0 for r in ok], s=8, label="TTFT")
    if bad:
        ax.scatter([r.start_time - bench_start for r in bad], [(r.e2e or 0.0) * 1000.0 for r in bad],
                   s=12, marker="x", color="red", label="failed")
    ax.set(title="Latency over the run", xlabel="request start (s)", ylabel="latency (ms)")
    if records:
        ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(ax: Any, values: np.ndarray) -> None:
    """A histogram that also copes with (nearly) identical values, which numpy cannot bin."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        ax.hist(values, bins=1, range=(lo - 0.5, hi + 0.5), color="tab:blue", alpha=0.8)
    else:
        ax.hist(values, bins=min(50, max(5, values.size // 2)), color="tab:blue", alpha=0.8)
