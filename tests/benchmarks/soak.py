"""Soak: moderate streaming load for minutes; zero errors and flat memory (issue 13).

    python tests/benchmarks/soak.py [--minutes 10] [--warmup-minutes 2] [--clients 4]
        [--max-tokens 32] [--out bench-results/soak.json] [-- extra pdserve up flags]

`clients` stream one request after another (honouring Retry-After) for `minutes`. Reported: how
requests ended (the goal: every one a 200 with no error event), each process's RSS when the
warm-up ends and at the end, and its growth in percent (the goal: under 5%).
"""

from __future__ import annotations

import argparse

from stack_probe import (RssSampler, Stack, add_run_arguments, load_then_settle, measure_and_save,
                         outcome_counts, p50_p99, run_header)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    add_run_arguments(p)
    args = p.parse_args()

    def measure(stack: Stack) -> dict:
        with RssSampler(stack, interval=5.0) as rss:
            run = load_then_settle(stack, args.clients, args.minutes * 60, args.max_tokens,
                                   honour_retry=True, settle_timeout=60)
        warm, last = rss.at(run.started + args.warmup_minutes * 60), rss.at(run.ended - 1)
        growth = {name: round(100 * (last[name] - warm[name]) / warm[name], 2)
                  for name in warm if name in last and warm[name]}
        served = [o for o in run.load.outcomes if o.status == 200]
        return {
            **run_header("soak.py", stack),
            "minutes": args.minutes, "clients": args.clients,
            "outcomes": outcome_counts(run.load),
            "errors": sum(1 for o in run.load.outcomes if o.status != 200 or o.error_event),
            "latency_s": p50_p99([o.seconds for o in served]),
            "rss_after_warmup_mib": {k: round(v, 1) for k, v in warm.items()},
            "rss_at_end_mib": {k: round(v, 1) for k, v in last.items()},
            "rss_growth_percent": growth,
            "max_rss_growth_percent": max(growth.values(), default=None),
            "settled_after_load_s": run.settled_s,
        }

    measure_and_save(args.flags, measure, args.out)


if __name__ == "__main__":
    main()
