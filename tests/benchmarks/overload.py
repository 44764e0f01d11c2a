"""Overload: 10x the stack's capacity for a bounded time, then recovery (issue 13).

    python tests/benchmarks/overload.py [--multiple 10] [--seconds 60] [--max-tokens 16]
        [--out bench-results/overload.json] [-- extra pdserve up flags]

Capacity is the stack's batch capacity (sequences it runs at once: min(--max-num-seqs, KV
blocks) per worker, from /workers); `multiple` x capacity clients each stream one request after
another for `seconds`, waiting what a 429's retry-after-ms says (at most 2 s) as the openai SDK
does, or not at all with --ignore-retry-after (a flood of refusals). Reported: how requests
ended, the 429s' latency p50/p99 (request sent to refusal received), every process's peak RSS,
the seconds until no request runs or waits and no KV block is held once the load stops, and a
probe request afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import os
import time
from collections import Counter
from pathlib import Path

import httpx

from stack_probe import RssSampler, pct, probe, run_load, save, settled, start_stack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--multiple", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--ignore-retry-after", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("flags", nargs="*", help="extra pdserve up flags (after --)")
    args = p.parse_args()
    stack = start_stack(["--max-num-seqs", str(args.max_num_seqs), *args.flags])
    try:
        workers = httpx.get(f"{stack.url}/workers").json()
        capacity = sum(min(args.max_num_seqs, w["blocks_total"]) for w in workers if w["state"] == "ready")
        clients = int(args.multiple * capacity)
        print(f"capacity {capacity} sequences; {clients} clients for {args.seconds:.0f} s", flush=True)
        with RssSampler(stack) as rss:
            started = time.monotonic()
            load = asyncio.run(run_load(stack.url, clients, args.seconds, args.max_tokens,
                                      honour_retry=not args.ignore_retry_after))
            load_seconds = time.monotonic() - started
            recovery = settled(stack.url, 120)
            status, probe_seconds = probe(stack.url)
        refused = [o.seconds for o in load.outcomes if o.status == 429]
        served = [o for o in load.outcomes if o.status == 200]
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
            "command": "python tests/benchmarks/overload.py " + " ".join(os.sys.argv[1:]),
            "stack": " ".join(stack.command),
            "capacity": capacity, "clients": clients, "load_seconds": round(load_seconds, 1),
            "outcomes": dict(Counter(str(o.status) for o in load.outcomes)),
            "served_with_error_event": sum(1 for o in served if o.error_event),
            "served_per_second": round(len(served) / load_seconds, 2),
            "latency_429_s": {"p50": pct(refused, 50), "p99": pct(refused, 99), "max": max(refused, default=None)},
            "latency_200_s": {"p50": pct([o.seconds for o in served], 50), "p99": pct([o.seconds for o in served], 99)},
            "peak_rss_mib": rss.peak(),
            "settled_after_load_s": recovery,
            "probe_after": {"status": status, "seconds": probe_seconds},
        }
    finally:
        result_code = stack.stop()
    result["stack_exit_status"] = result_code
    save(args.out, result)


if __name__ == "__main__":
    main()
