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

import httpx

from stack_probe import (RssSampler, Stack, add_run_arguments, load_then_settle, measure_and_save,
                         outcome_counts, p50_p99, probe, run_header)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--multiple", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--ignore-retry-after", action="store_true")
    add_run_arguments(p)
    args = p.parse_args()

    def measure(stack: Stack) -> dict:
        workers = httpx.get(f"{stack.url}/workers").json()
        capacity = sum(min(args.max_num_seqs, w["blocks_total"]) for w in workers if w["state"] == "ready")
        clients = int(args.multiple * capacity)
        print(f"capacity {capacity} sequences; {clients} clients for {args.seconds:.0f} s", flush=True)
        with RssSampler(stack) as rss:
            run = load_then_settle(stack, clients, args.seconds, args.max_tokens,
                                   honour_retry=not args.ignore_retry_after, settle_timeout=120)
            status, probe_seconds = probe(stack.url)
        load_seconds = run.ended - run.started
        refused = [o.seconds for o in run.load.outcomes if o.status == 429]
        served = [o for o in run.load.outcomes if o.status == 200]
        return {
            **run_header("overload.py", stack),
            "capacity": capacity, "clients": clients, "load_seconds": round(load_seconds, 1),
            "outcomes": outcome_counts(run.load),
            "served_with_error_event": sum(1 for o in served if o.error_event),
            "served_per_second": round(len(served) / load_seconds, 2),
            "latency_429_s": {**p50_p99(refused), "max": max(refused, default=None)},
            "latency_200_s": p50_p99([o.seconds for o in served]),
            "peak_rss_mib": rss.peak(),
            "settled_after_load_s": run.settled_s,
            "probe_after": {"status": status, "seconds": probe_seconds},
        }

    measure_and_save(["--max-num-seqs", str(args.max_num_seqs), *args.flags], measure, args.out)


if __name__ == "__main__":
    main()
