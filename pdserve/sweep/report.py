"""A sweep's results: one JSON file (every point, written after each), a Markdown table with the
goodput per layout and the recommendation, and PNG plots."""

from __future__ import annotations

import json
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from pdserve.sweep.experiment import SLO, Experiment
from pdserve.sweep.goodput import LayoutGoodput, PointResult, count_workers, layout_goodput, recommend


def point_key(layout: str, kind: str, load: float, rep: int) -> str:
    return f"{layout}|{kind}|{load:g}|{rep}"


def new_results(exp: Experiment, command: list[str]) -> dict[str, Any]:
    return {"experiment": exp.name, "command": command, "commit": _commit(), "machine": _machine(),
            "date": __import__("time").strftime("%Y-%m-%d %H:%M:%S %Z"),
            "slo": {"ttft_ms": exp.slo.ttft_ms, "tpot_ms": exp.slo.tpot_ms, "itl_ms": exp.slo.itl_ms,
                    "attainment": exp.slo.attainment},
            "layouts": {l.name: {"flags": l.flags, "base_url": l.base_url, "workers": _workers(exp, l.name)}
                        for l in exp.layouts},
            "stack_flags": exp.stack_flags, "points": [], "failed": []}


def save(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def goodputs(results: dict[str, Any], target: float) -> dict[str, list[LayoutGoodput]]:
    """Per load kind ("rate", "concurrency"): each layout's goodput over its points."""
    by: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for p in results["points"]:
        by[(p["layout"], p["kind"], p["load"])].append(p["attainment"])
    out: dict[str, list[LayoutGoodput]] = defaultdict(list)
    for kind in sorted({k for _, k, _ in by}):
        for layout in results["layouts"]:
            points = [PointResult(l, k, load, tuple(a)) for (l, k, load), a in sorted(by.items())
                      if l == layout and k == kind]
            if points:
                out[kind].append(layout_goodput(points, results["layouts"][layout]["workers"], target))
    return out


def markdown(results: dict[str, Any]) -> str:
    slo = results["slo"]
    limits = ", ".join(f"{k[:-3].upper()} <= {v:g} ms" for k, v in slo.items() if k.endswith("_ms") and v)
    lines = [f"Sweep `{results['experiment']}` (commit {results['commit']}, {results['machine']}); "
             f"SLOs: {limits}; goodput needs {slo['attainment']:.0%} of requests within them.", "",
             "| layout | load | rep | SLO met | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | output tok/s |",
             "|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        s = p["summary"]
        lines.append(f"| {p['layout']} | {p['kind']} {p['load']:g} | {p['rep']} | {p['attainment']:.0%} | "
                     f"{_ms(s['ttft_ms'], 'p50')} / {_ms(s['ttft_ms'], 'p99')} | "
                     f"{_ms(s['tpot_ms'], 'p50')} / {_ms(s['tpot_ms'], 'p99')} | {s['output_throughput']:.1f} |")
    for f in results["failed"]:
        lines.append(f"| {f['layout']} | {f.get('kind', '')} {f.get('load', '')} | | failed: {f['error'][:80]} | | | |")
    lines.append("")
    for kind, gps in goodputs(results, slo["attainment"]).items():
        unit = "req/s" if kind == "rate" else "concurrent requests"
        lines.append(f"Goodput by {kind} ({unit} at which {slo['attainment']:.0%} meet the SLOs, per worker): "
                     + ", ".join(f"{g.layout} {g.goodput:g} ({g.per_worker:.3g}/worker)" for g in gps) + ".")
        lines.append(recommend(gps) + ".")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Attainment vs load; TTFT and TPOT p50/p99 vs load; the server's TTFT breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in sorted({p["kind"] for p in results["points"]}):
        points = [p for p in results["points"] if p["kind"] == kind]
        layouts = list(dict.fromkeys(p["layout"] for p in points))
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for layout in layouts:
            mine = sorted((p for p in points if p["layout"] == layout), key=lambda p: p["load"])
            loads = [p["load"] for p in mine]
            axes[0].plot(loads, [p["attainment"] for p in mine], marker="o", label=layout)
            for metric, style in (("ttft_ms", "-"), ("tpot_ms", "--")):
                for q in ("p50", "p99"):
                    axes[1].plot(loads, [p["summary"][metric][q] for p in mine], style, marker=".",
                                 label=f"{layout} {metric[:-3].upper()} {q}")
        axes[0].axhline(results["slo"]["attainment"], color="grey", linestyle=":")
        axes[0].set(xlabel=kind, ylabel="share of requests within the SLOs", ylim=(0, 1.05),
                    title="SLO attainment")
        axes[1].set(xlabel=kind, ylabel="ms", yscale="log", title="TTFT and TPOT")
        _breakdown(axes[2], points, layouts)
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / f"sweep-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _breakdown(ax: Any, points: list[dict], layouts: list[str]) -> None:
    labels, bottoms = [], []
    parts = {"queue": [], "prefill": [], "kv_transfer": []}
    for layout in layouts:
        for p in sorted((p for p in points if p["layout"] == layout), key=lambda p: p["load"]):
            phases = p.get("server_phases") or {}
            labels.append(f"{layout}\n{p['load']:g}")
            for name in parts:
                parts[name].append(phases.get(f"{name}_mean_ms") or 0.0)
    bottoms = [0.0] * len(labels)
    for name, values in parts.items():
        ax.bar(range(len(labels)), values, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set(ylabel="mean ms (server)", title="Server phases: queue + prefill (= TTFT), then KV transfer")
    ax.legend(fontsize=8)


def _ms(dist: dict, key: str) -> str:
    value = dist.get(key)
    return "n/a" if value is None else f"{value:.0f}"


def _workers(exp: Experiment, name: str) -> int:
    layout = next(l for l in exp.layouts if l.name == name)
    return count_workers([*exp.stack_flags, *layout.flags]) if layout.base_url is None else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    return f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)"


def slo_limits(slo: SLO) -> dict[str, float]:
    return {k: v for k, v in (("ttft", slo.ttft_ms), ("tpot", slo.tpot_ms)) if v is not None}
