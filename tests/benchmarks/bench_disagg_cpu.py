"""CPU: 1 prefill + 1 decode worker against 2 mixed workers on a prefill-heavy load.

    python tests/benchmarks/bench_disagg_cpu.py [--rates 0.5,1,2] [--num-prompts 40] [--out DIR]

Each layout is started with `pdserve up` (every worker on one thread, the bundled SmolLM2), warmed
up, then loaded by `pdserve bench` (random prompts of ~512 tokens, 64 output tokens, ignore_eos,
Poisson arrivals) at each rate; goodput counts requests within the TPOT SLO (and TTFT SLO) given.
Prints one Markdown table and writes every bench JSON plus a summary JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.service_fixture import free_port, wait_until_ready  # noqa: E402

LAYOUTS = {
    "2 mixed": ["--workers", "2"],
    "1 prefill + 1 decode": ["--prefill-workers", "1", "--decode-workers", "1"],
}


def run_layout(name: str, flags: list[str], args, out: Path) -> list[dict]:
    port = free_port()
    slug = name.replace(" ", "").replace("+", "_")
    log = out / f"stack-{slug}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--torch-threads", "1",
           "--max-num-batched-tokens", "512", *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        if not wait_until_ready(url, 300, alive=lambda: proc.poll() is None):
            raise RuntimeError(log.read_text()[-2000:])
        bench = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--endpoint", "completions",
                 "--random-input-len", "512", "--random-output-len", "64", "--ignore-eos", "--temperature", "0",
                 "--slo", args.slo]
        subprocess.run([*bench, "--num-prompts", "4", "--seed", "1000",
                        "--output-json", str(out / f"warmup-{slug}.json")], check=True, capture_output=True)
        for i, rate in enumerate(args.rates):
            # One seed per rate, the same in every layout: each point sees new prompts (no prefix
            # cache hits from an earlier point) and every layout sees the same ones.
            result = out / f"bench-{slug}-rate{rate}.json"
            done = subprocess.run([*bench, "--num-prompts", str(args.num_prompts), "--request-rate", str(rate),
                                   "--seed", str(i + 1), "--output-json", str(result)], capture_output=True, text=True)
            print(done.stdout, flush=True)
            rows.append(row_of(name, rate, result, args.tpot_slo_ms))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def row_of(layout: str, rate: float, result: Path, tpot_slo_ms: float) -> dict:
    """The bench summary plus goodput under the TPOT SLO alone, from the per-request records."""
    doc = json.loads(result.read_text())
    ok = [r for r in doc["requests"] if r["success"]]
    good = sum(1 for r in ok if r["tpot"] is not None and r["tpot"] * 1000 <= tpot_slo_ms)
    duration = doc["summary"]["duration_s"]
    return {"layout": layout, "rate": rate, **doc["summary"], "tpot_slo_ms": tpot_slo_ms,
            "tpot_goodput": good / duration if duration else 0.0,
            "tpot_goodput_fraction": good / len(doc["requests"]) if doc["requests"] else 0.0}


def table(rows: list[dict], slo: str) -> str:
    tpot_slo = rows[0]["tpot_slo_ms"] if rows else 0
    head = ("| layout | rate (req/s) | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | output tok/s | "
            f"goodput, TPOT <= {tpot_slo:g} ms (req/s, met) | goodput [{slo}] (req/s, met) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        lines.append(f"| {r['layout']} | {r['rate']:g} | {ttft['p50']:.0f} / {ttft['p99']:.0f} | "
                     f"{tpot['p50']:.1f} / {tpot['p99']:.1f} | {r['output_throughput']:.1f} | "
                     f"{r['tpot_goodput']:.2f}, {r['tpot_goodput_fraction']:.0%} | "
                     f"{r['goodput']:.2f}, {r['goodput_fraction']:.0%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rates", default="0.5,1,2", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--slo", default="ttft=2000,tpot=100")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0, help="the TPOT-only goodput column")
    p.add_argument("--out", type=Path, default=Path("bench-results/disagg-cpu"))
    p.add_argument("--table-only", action="store_true", help="rebuild the table from --out's results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, flags in LAYOUTS.items():
        if args.table_only:
            slug = name.replace(" ", "").replace("+", "_")
            rows += [row_of(name, rate, args.out / f"bench-{slug}-rate{rate}.json", args.tpot_slo_ms)
                     for rate in args.rates]
        else:
            rows += run_layout(name, flags, args, args.out)
    text = table(rows, args.slo)
    print(text)
    (args.out / "summary.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "rows": rows}, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
