"""Disaggregation on one GPU (a script for the lent GPU machine, not a test): two worker processes.

    python tests/benchmarks/gpu_disagg.py --out DIR

1. Greedy equality on CUDA: a 1-prefill + 1-decode stack against a 1-mixed stack, SmolLM2-135M
   shapes with the same seeded dummy weights in float32; the KV of every request crosses between
   the two worker processes (cuda-ipc when both are CUDA workers of one host).
2. Llama-3.1-8B shapes, bf16 dummy weights, 1 prefill + 1 decode worker sharing the GPU: prompts
   of 512, 2048 and 8192 tokens sent one at a time; the server's phase means (prefill = TTFT on the
   server, KV transfer, decode) and the transfers' bytes from /metrics, so the transfer's share of
   TTFT and its bandwidth inside the real stack are read off the same run.
The transfer bandwidth against a plain device-to-device copy is tests/benchmarks/kv_transfer_gpu.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdserve.bench import server_phases  # noqa: E402
from tests.benchmarks.synthetic_model import write_model_dir  # noqa: E402
from tests.service_fixture import free_port, wait_until_ready  # noqa: E402


DEVICE = "cuda"


def start(model_dir: Path, run_dir: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "--log-level", "INFO", "up", "--model", str(model_dir),
           "--port", str(port), "--run-dir", str(run_dir), "--device", DEVICE, "--load-format", "dummy",
           "--seed", "7", "--served-model-name", "m", *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, 600, alive=lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError(f"stack not ready: {log.read_text()[-3000:]}")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def completions(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    async def one(client, prompt):
        r = await client.post(f"{url}/v1/completions", json={
            "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    async def all_():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))
    return asyncio.run(all_())


def phases(url: str, before):
    async def scrape():
        async with httpx.AsyncClient(timeout=30) as client:
            return await server_phases.scrape(client, url)
    after = asyncio.run(scrape())
    return after if before is None else server_phases.breakdown(before, after)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--work", default="/tmp/pdserve-gpu-disagg")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of part 1 only")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S")}

    small = write_model_dir("smollm2-135m", work / "smollm2")
    prompts = [" ".join(f"w{(i * 37 + j * 11) % 40000 + 100}" for j in range(40 + 7 * i)) for i in range(8)]
    texts = {}
    for name, flags in (("colocated", ["--workers", "1"]),
                        ("disaggregated", ["--prefill-workers", "1", "--decode-workers", "1",
                                           "--max-local-prefill-tokens", "0"])):
        proc, url = start(small, work / f"run-{name}", out / f"stack-{name}.log", "--dtype", "float32",
                          "--num-kv-blocks", "2048", "--check-integrity-interval", "1", *flags)
        try:
            texts[name] = completions(url, prompts, 32)
            time.sleep(1.2)  # /workers and /metrics follow the scheduler's stats, twice a second
            report[f"{name}_workers"] = httpx.get(f"{url}/workers").json()
            metrics = httpx.get(f"{url}/metrics").text
            report[f"{name}_integrity_failures"] = [l for l in metrics.splitlines()
                                                    if l.startswith("pdserve:kv_integrity_failures_total")]
        finally:
            stop(proc)
    report["greedy_equal"] = sum(a == b for a, b in zip(texts["colocated"], texts["disaggregated"]))
    report["greedy_total"] = len(prompts)
    print(json.dumps({k: report[k] for k in ("greedy_equal", "greedy_total")}), flush=True)

    if DEVICE != "cuda":
        (out / "gpu_disagg.json").write_text(json.dumps(report, indent=2))
        return 0
    big = write_model_dir("llama-3.1-8b", work / "llama")
    proc, url = start(big, work / "run-8b", out / "stack-8b.log", "--prefill-workers", "1", "--decode-workers", "1",
                      "--max-local-prefill-tokens", "0", "--num-kv-blocks", "4096", "--max-num-batched-tokens", "8192",
                      "--max-model-len", "16384")
    try:
        report["8b_workers"] = httpx.get(f"{url}/workers").json()
        completions(url, [" ".join("w5" for _ in range(64))], 4)  # warm up both workers and the transfer path
        rows = []
        for n in (512, 2048, 8192):
            for rep in range(3):
                before = phases(url, None)
                prompt = " ".join(f"w{(n * 7 + rep * 131 + j * 13) % 120000 + 10}" for j in range(n))
                t0 = time.perf_counter()
                completions(url, [prompt], 16)
                wall = time.perf_counter() - t0
                time.sleep(1.2)  # phase records arrive with the stats, twice a second
                ph = phases(url, before)
                rows.append({"prompt_tokens": n, "rep": rep, "wall_s": round(wall, 4), **ph})
                print(json.dumps(rows[-1]), flush=True)
        report["8b_rows"] = rows
        report["8b_workers_after"] = httpx.get(f"{url}/workers").json()
    finally:
        stop(proc)
    (out / "gpu_disagg.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
