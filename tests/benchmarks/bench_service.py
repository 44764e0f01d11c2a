"""Throughput through the full HTTP stack vs the offline engine, same workload, one run.

    python tests/benchmarks/bench_service.py [--num-prompts 32] [--max-tokens 64] [--rounds 3] [-- flags]

Offline: `pdserve generate` (its own stats line; model loading excluded). Service: `pdserve up`,
then every request sent at once as a streaming chat completion (ignore_eos, so each yields
exactly --max-tokens tokens); throughput = generated tokens / wall time from the first request
to the last byte. Startup is excluded on both sides; the two runs never overlap.

This 2-core VM's speed drifts by 10-20% over minutes, so the two are measured in alternating
rounds (offline, then service, each in fresh processes) and the figure is the median of the
per-round ratios; every round is printed and saved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench_stack import save_result, served  # beside this script

TOPICS = ["the sea", "volcanoes", "bread", "chess", "the moon", "bees", "trains", "rain",
          "coffee", "maps", "owls", "glass", "rivers", "music", "snow", "bridges"]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]


def run_offline(questions: list[str], max_tokens: int, extra: list[str], workdir: Path) -> dict:
    f = workdir / "prompts.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "ignore_eos": True,
                                     "min_tokens": max_tokens}) + "\n" for q in questions))
    cmd = [sys.executable, "-m", "pdserve.cli", "generate", "--prompts-file", str(f), "--max-tokens",
           str(max_tokens), "--temperature", "0", "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"command": " ".join(cmd[1:]), **stats}


async def _one(client: aiohttp.ClientSession, url: str, q: str, max_tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    # The client shares the cores with the server, so it does as little as it can (aiohttp's C
    # parser; it keeps the raw tail and parses only the last events: usage chunk, [DONE]).
    tail = b""
    async with client.post(f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for data in r.content.iter_any():
            tail = (tail + data)[-4096:]
    events = [e for e in tail.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"data: [DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {tail[-200:]!r}")
    usage = json.loads(events[-2][6:]).get("usage")
    if not usage:
        raise RuntimeError(f"no usage chunk before [DONE]: {events[-2][:200]!r}")
    return usage["completion_tokens"]


async def _worker_counters(client: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    """Steps and busy seconds of the (first) worker, from /workers (published every 0.5 s)."""
    await asyncio.sleep(0.7)
    async with client.get(f"{url}/workers") as r:
        w = (await r.json())[0]
    return w["steps"], w["busy_seconds"]


async def _load(url: str, questions: list[str], max_tokens: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as client:
        await _one(client, url, "Hello", 4)  # warm-up
        steps0, busy0 = await _worker_counters(client, url)
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one(client, url, q, max_tokens) for q in questions))
        seconds = time.perf_counter() - start
        steps1, busy1 = await _worker_counters(client, url)
    return {"wall_seconds": round(seconds, 4), "generated_tokens": sum(counts),
            "tokens_per_second": round(sum(counts) / seconds, 2), "worker_steps": steps1 - steps0,
            "worker_busy_seconds": round(busy1 - busy0, 4)}


def run_service(questions: list[str], max_tokens: int, extra: list[str], workdir: Path) -> dict:
    with served(extra, workdir / "up.log", ready_timeout=300, stop_timeout=60) as (url, cmd):
        load = asyncio.run(_load(url, questions, max_tokens))
    return {"command": " ".join(cmd[1:]), **load}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating offline/service rounds")
    p.add_argument("--output", default="bench-results/service.json")
    p.add_argument("extra", nargs="*", help="flags for both `pdserve generate` and `pdserve up`")
    args = p.parse_args()
    questions = prompts(args.num_prompts)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            offline = run_offline(questions, args.max_tokens, args.extra, Path(tmp))
            service = run_service(questions, args.max_tokens, args.extra, Path(tmp))
            ratio = service["tokens_per_second"] / offline["tokens_per_second"]
            rounds.append({"offline": offline, "service": service, "ratio": round(ratio, 3)})
            print(f"round {r + 1}: offline {offline['tokens_per_second']:7.1f} tok/s, service "
                  f"{service['tokens_per_second']:7.1f} tok/s ({service['generated_tokens']} tokens, "
                  f"{service['worker_steps']} steps), ratio {ratio:.3f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    save_result(args.output, {
        "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "rounds": rounds,
        "ratio_service_over_offline": round(ratio, 3),
        "offline_tokens_per_second_median": statistics.median(r["offline"]["tokens_per_second"] for r in rounds),
        "service_tokens_per_second_median": statistics.median(r["service"]["tokens_per_second"] for r in rounds)})
    print(f"median ratio service/offline over {len(rounds)} rounds: {ratio:.3f} "
          f"(rounds: {', '.join(str(r['ratio']) for r in rounds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
