"""The full stack on the GPU (a script for the lent GPU machine): issue 8's serving benchmark.

    python tests/benchmarks/gpu_serving.py --out DIR [--num-prompts 1000] [--rates 4,16]

Llama-3.1-8B shapes, dummy bf16 weights, one mixed worker (`pdserve up --device cuda`). The load
is ShareGPT-like and synthetic (no dataset can be downloaded): prompt and reply lengths drawn
from log-normal distributions with means ~200 and ~180 tokens (sigma 0.9, a long tail), clipped
as vLLM's ShareGPT filter clips (4..1024 prompt tokens, 2048 in all), written as a ShareGPT JSON
file of word-level texts that the synthetic tokenizer turns into exactly those lengths. Measured:
`pdserve bench` with every request at once (output tokens/s), then Poisson rates (TTFT/TPOT
percentiles), then the offline engine on the same prompts in the same run (full stack / offline).
Results are written after every phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.synthetic_model import write_model_dir  # noqa: E402
from tests.service_fixture import free_port, wait_until_ready  # noqa: E402

FLAGS = ["--max-num-seqs", "256", "--max-num-batched-tokens", "8192", "--seed", "7"]


def lognormal_lengths(rng: random.Random, n: int, mean: float, sigma: float = 0.9) -> list[int]:
    mu = math.log(mean) - sigma * sigma / 2
    return [max(4, int(round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def sharegpt_like(path: Path, n: int, seed: int) -> list[tuple[str, int]]:
    """Write the dataset; return (prompt text, reply length) of the entries kept."""
    rng = random.Random(seed)
    entries, kept = [], []
    prompts, replies = lognormal_lengths(rng, n * 2, 200), lognormal_lengths(rng, n * 2, 180)
    for p_len, o_len in zip(prompts, replies):
        if len(kept) == n:
            break
        if p_len > 1024 or p_len + o_len > 2048:
            continue
        prompt = " ".join(f"w{rng.randrange(10, 120000)}" for _ in range(p_len))
        reply = " ".join(f"w{rng.randrange(10, 120000)}" for _ in range(o_len))
        entries.append({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]})
        kept.append((prompt, o_len))
    path.write_text(json.dumps(entries))
    return kept


def bench(url: str, model_dir: Path, data: Path, n: int, out: Path, rate: str) -> dict:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--endpoint", "completions",
           "--dataset", "sharegpt", "--dataset-path", str(data), "--tokenizer", str(model_dir),
           "--num-prompts", str(n), "--ignore-eos", "--temperature", "0", "--request-rate", rate,
           "--output-json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout[-2500:], done.stderr[-1000:], flush=True)
    return json.loads(out.read_text())["summary"]


def offline(model_dir: Path, kept: list[tuple[str, int]]) -> dict:
    from pdserve.offline_engine import OfflineEngine, make_request
    from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
    from protocol.sampling import SamplingParams
    from tokenizer_svc.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    engine = OfflineEngine(ModelSettings(model=str(model_dir), load_format="dummy", device="cuda", seed=7),
                           CacheSettings(), SchedulerSettings(max_num_seqs=256, max_num_batched_tokens=8192))
    reqs = [make_request(f"r{i}", tok.encode(p), SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0), [])
            for i, (p, o) in enumerate(kept)]
    engine.generate(reqs[:8])
    reqs = [make_request(f"s{i}", tok.encode(p), SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0), [])
            for i, (p, o) in enumerate(kept)]
    start = time.perf_counter()
    res = engine.generate(reqs)
    seconds = time.perf_counter() - start
    out_tokens = sum(len(r.token_ids) for r in res)
    return {"seconds": seconds, "output_tokens": out_tokens, "output_throughput": out_tokens / seconds,
            "steps": engine.num_steps}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--rates", default="4,16")
    p.add_argument("--rate-prompts", type=int, default=160)
    p.add_argument("--work", default="/tmp/pdserve-gpu-serving")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir("llama-3.1-8b", work / "llama")
    data = work / "sharegpt_like.json"
    kept = sharegpt_like(data, args.num_prompts, seed=0)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "requests": len(kept),
                    "mean_prompt_words": sum(len(p.split()) for p, _ in kept) / len(kept),
                    "mean_output": sum(o for _, o in kept) / len(kept)}
    save = lambda: (out / "gpu_serving.json").write_text(json.dumps(report, indent=2))  # noqa: E731
    port = free_port()
    log = out / "stack.log"
    cmd = [sys.executable, "-m", "pdserve.cli", "--log-level", "INFO", "up", "--model", str(model_dir),
           "--served-model-name", "m", "--port", str(port), "--device", "cuda", "--load-format", "dummy",
           "--tokenizers", "4", "--detokenizers", "4", *FLAGS]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        if not wait_until_ready(url, 300, alive=lambda: proc.poll() is None):
            raise RuntimeError(log.read_text()[-3000:])
        report["ready_seconds"] = time.perf_counter() - t0
        bench(url, model_dir, data, 16, work / "warm.json", "inf")
        report["all_at_once"] = bench(url, model_dir, data, len(kept), out / "bench-all.json", "inf")
        save()
        for rate in args.rates.split(","):
            report[f"rate_{rate}"] = bench(url, model_dir, data, args.rate_prompts, out / f"bench-rate{rate}.json", rate)
            save()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    report["offline"] = offline(model_dir, kept)
    report["stack_over_offline"] = report["all_at_once"]["output_throughput"] / report["offline"]["output_throughput"]
    save()
    print(json.dumps({k: report[k] for k in ("requests", "ready_seconds", "stack_over_offline")}), flush=True)
    print(json.dumps(report["offline"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
