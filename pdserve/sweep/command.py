"""`pdserve sweep EXPERIMENT.toml [--out DIR] [--resume]`: every layout under every load point.

For each layout: start its stack (or use its base_url), wait for /ready, warm up, run each load
point (and repetition) with pdserve bench's client, stop the stack and check that none of its
processes is left. Results go to DIR/results.json after every point (so --resume skips what is
done), then DIR/table.md and DIR/sweep-<rate|concurrency>.png. A layout that cannot start is
recorded as failed with its log's tail, and the sweep goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="compare worker layouts under load: goodput table, plots, a recommendation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path, help="the experiment file (TOML; see pdserve/sweep/experiment.py)")
    p.add_argument("--out", type=Path, help="results directory (default bench-results/sweep-<name>)")
    p.add_argument("--resume", action="store_true", help="keep DIR/results.json and skip the points it has")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a stack may take to be ready")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pdserve.bench.report import summarize
    from pdserve.sweep import report, runner
    from pdserve.sweep.experiment import ExperimentError, load_experiment
    from pdserve.sweep.goodput import attainment

    try:
        exp = load_experiment(args.experiment)
    except ExperimentError as exc:
        print(f"pdserve sweep: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("bench-results") / f"sweep-{exp.name}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = report.new_results(exp, sys.argv)
    if args.resume and path.is_file():
        old = json.loads(path.read_text())
        results["points"], results["failed"] = old.get("points", []), []
    done = {report.point_key(p["layout"], p["kind"], p["load"], p["rep"]) for p in results["points"]}
    slo = report.slo_limits(exp.slo)
    todo = [(layout, kind, load, rep) for layout in exp.layouts for kind, load in exp.points
            for rep in range(exp.repetitions)
            if report.point_key(layout.name, kind, load, rep) not in done]
    bar = tqdm(total=len(todo), desc="sweep", unit="point", file=sys.stderr)
    for layout in exp.layouts:
        mine = [t for t in todo if t[0] is layout]
        if not mine:
            continue
        bar.set_postfix_str(f"{layout.name}: starting")
        try:
            stack = runner.start_stack(exp, layout, out / f"stack-{layout.name}.log", args.ready_timeout)
        except runner.StackFailed as exc:
            results["failed"].append({"layout": layout.name, "error": str(exc)})
            report.save(path, results)
            bar.update(len(mine))
            continue
        if stack.command is not None:
            results["layouts"][layout.name]["command"] = stack.command[2:]
        try:
            warm = runner.build_workload(exp, seed=10_000)[:4]
            asyncio.run(runner.run_point(stack.url, warm, "concurrency", 4, seed=0))
            for _, kind, load, rep in mine:
                bar.set_postfix_str(f"{layout.name}: {kind} {load:g}, rep {rep}")
                # New prompts at every point and repetition (no prefix-cache hits from an earlier
                # one), the same ones in every layout.
                index = exp.points.index((kind, load))
                requests = runner.build_workload(exp, seed=exp.workload.seed + 1000 * index + rep)
                sent = tqdm(total=len(requests), desc="  requests", unit="req", leave=False, file=sys.stderr)
                try:
                    point = asyncio.run(runner.run_point(stack.url, requests, kind, load, seed=rep,
                                                         on_done=sent.update))
                except Exception as exc:  # one bad point must not end the sweep
                    results["failed"].append({"layout": layout.name, "kind": kind, "load": load, "rep": rep,
                                              "error": f"{type(exc).__name__}: {exc}"})
                else:
                    records = point["records"]
                    results["points"].append({
                        "layout": layout.name, "kind": kind, "load": load, "rep": rep,
                        "summary": summarize(records, point["duration"], slo, point["not_sent"]),
                        "attainment": attainment(records, exp.slo), "server_phases": point["server_phases"],
                        "busy_seconds": point["busy_seconds"]})
                sent.close()
                report.save(path, results)
                bar.update(1)
        finally:
            left = runner.stop_stack(stack)
            if left:
                results["failed"].append({"layout": layout.name, "error": f"processes left running: {left}"})
                report.save(path, results)
    bar.close()
    report.save(path, results)
    table = report.markdown(results)
    (out / "table.md").write_text(table)
    plots = report.plot(results, out) if results["points"] else []
    print(table)
    print(f"results: {path}" + "".join(f"\nplot: {p}" for p in plots))
    return 1 if results["failed"] else 0
