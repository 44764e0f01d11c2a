"""Throughput through the full HTTP stack vs the offline engine, same workload, one run.

    python tests/benchmarks/bench_service.py [--num-prompts 32] [--max-tokens 64] [-- up flags]

Offline: `pdserve generate` (its own stats line; model loading excluded). Service: `pdserve up`,
then every request sent at once as a streaming chat completion (ignore_eos, so each yields
exactly --max-tokens tokens); throughput = generated tokens / wall time from the first request
to the last byte. Startup is excluded on both sides; the two runs never overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from quiet_machine import git_state, machine_info  # noqa: E402 (beside this script)
from tests.service_fixture import free_port, wait_until_ready  # noqa: E402

TOPICS = ["the sea", "volcanoes", "bread", "chess", "the moon", "bees", "trains", "rain",
          "coffee", "maps", "owls", "glass", "rivers", "music", "snow", "bridges"]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]


def run_offline(questions: list[str], max_tokens: int, extra: list[str], workdir: Path) -> dict:
    f = workdir / "prompts.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "ignore_eos": True,
                                     "min_tokens": max_tokens}) + "\n" for q in questions))
    cmd = [sys.executable, "-m", "gateway.cli", "generate", "--prompts-file", str(f), "--max-tokens",
           str(max_tokens), "--temperature", "0", "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"command": " ".join(cmd[1:]), **stats}


async def _one(client: httpx.AsyncClient, url: str, q: str, max_tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


async def _load(url: str, questions: list[str], max_tokens: int) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=600) as client:
        await _one(client, url, "Hello", 4)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one(client, url, q, max_tokens) for q in questions))
        return time.perf_counter() - start, sum(counts)


def run_service(questions: list[str], max_tokens: int, extra: list[str], workdir: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "up", "--port", str(port), *extra]
    log = (workdir / "up.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_ready(url, 300, alive=lambda: proc.poll() is None):
            raise RuntimeError((workdir / "up.log").read_text()[-2000:])
        seconds, tokens = asyncio.run(_load(url, questions, max_tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"command": " ".join(cmd[1:]), "wall_seconds": round(seconds, 4), "generated_tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--output", default="bench-results/service.json")
    p.add_argument("extra", nargs="*", help="flags for both `pdserve generate` and `pdserve up`")
    args = p.parse_args()
    questions = prompts(args.num_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        offline = run_offline(questions, args.max_tokens, args.extra, Path(tmp))
        service = run_service(questions, args.max_tokens, args.extra, Path(tmp))
    ratio = service["tokens_per_second"] / offline["tokens_per_second"]
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv]), "num_prompts": args.num_prompts,
              "max_tokens": args.max_tokens, "offline": offline, "service": service,
              "ratio_service_over_offline": round(ratio, 3),
              "git": git_state(Path(__file__).resolve().parents[2]), "machine": machine_info()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"offline  {offline['tokens_per_second']:8.1f} tok/s  ({offline['generated_tokens']} tokens)")
    print(f"service  {service['tokens_per_second']:8.1f} tok/s  ({service['generated_tokens']} tokens)")
    print(f"ratio service/offline: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
