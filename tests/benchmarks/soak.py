"""Soak: moderate streaming load for minutes; zero errors and flat memory (issue 13).

    python tests/benchmarks/soak.py [--minutes 10] [--warmup-minutes 2] [--clients 4]
        [--max-tokens 32] [--out bench-results/soak.json] [-- extra pdserve up flags]

`clients` stream one request after another (honouring Retry-After) for `minutes`. Reported: how
requests ended (the goal: every one a 200 with no error event), each process's RSS when the
warm-up ends and at the end, and its growth in percent (the goal: under 5%).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import time
from collections import Counter
from pathlib import Path

from stack_probe import RssSampler, pct, run_load, save, settled, start_stack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("flags", nargs="*", help="extra pdserve up flags (after --)")
    args = p.parse_args()
    stack = start_stack(args.flags)
    try:
        with RssSampler(stack, interval=5.0) as rss:
            started = time.monotonic()
            load = asyncio.run(run_load(stack.url, args.clients, args.minutes * 60, args.max_tokens,
                                        honour_retry=True))
            ended = time.monotonic()
            recovery = settled(stack.url, 60)
        warm, last = rss.at(started + args.warmup_minutes * 60), rss.at(ended - 1)
        growth = {name: round(100 * (last[name] - warm[name]) / warm[name], 2)
                  for name in warm if name in last and warm[name]}
        served = [o for o in load.outcomes if o.status == 200]
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
            "command": "python tests/benchmarks/soak.py " + " ".join(os.sys.argv[1:]),
            "stack": " ".join(stack.command),
            "minutes": args.minutes, "clients": args.clients,
            "outcomes": dict(Counter(str(o.status) for o in load.outcomes)),
            "errors": sum(1 for o in load.outcomes if o.status != 200 or o.error_event),
            "latency_s": {"p50": pct([o.seconds for o in served], 50), "p99": pct([o.seconds for o in served], 99)},
            "rss_after_warmup_mib": {k: round(v, 1) for k, v in warm.items()},
            "rss_at_end_mib": {k: round(v, 1) for k, v in last.items()},
            "rss_growth_percent": growth,
            "max_rss_growth_percent": max(growth.values(), default=None),
            "settled_after_load_s": recovery,
        }
    finally:
        code = stack.stop()
    result["stack_exit_status"] = code
    save(args.out, result)


if __name__ == "__main__":
    main()
