"""The GPU benchmark of issue 8 (a script for the lent GPU machine): full stack, offline, transformers.

    python tests/benchmarks/gpu_serving.py --out DIR [--phases stack,offline,hf]
        [--num-prompts 2000] [--rates 4,16,32] [--max-num-seqs 1024] [--profile-seconds 20]

Llama-3.1-8B shapes, dummy bf16 weights. The ShareGPT-like load is synthetic (no dataset can be
downloaded): prompt and reply lengths drawn from log-normal distributions with means ~200 and
~180 tokens (sigma 0.9, a long tail), clipped as vLLM's ShareGPT filter clips (4..1024 prompt
tokens, 2048 in all), written as a ShareGPT JSON file of word-level texts that the synthetic
tokenizer turns into exactly those lengths. Phases (results go to DIR/gpu_serving.json after
each, merged with what an earlier run of another phase wrote there):
- stack: `pdserve up --device cuda` (one mixed worker, 4 tokenizers, 4 detokenizers) and
  `pdserve bench` with every request at once (output tokens/s, the workers' GPU idle time
  between steps), then Poisson rates (TTFT/TPOT percentiles). With `--profile-seconds`,
  py-spy (when installed) records every stage and the bench client for that long, 5 s into
  the all-at-once run, as collapsed stacks in DIR/pyspy-*.txt.
- offline: pdserve's offline engine on the same ShareGPT-like prompts, and on random 1024-token
  prompts x 128 tokens.
- hf: transformers' continuous batching (tests/benchmarks/hf_generate_batch.py) on both loads, or
  with `--hf-prompts N` on their first N requests (which the offline phase then also runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
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


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    return next((str(p / "bin/py-spy") for p in map(Path, sys.path) if (p / "bin/py-spy").exists()), None)


def profile_pids(pids: dict[str, int], seconds: int, out: Path, delay: float = 5.0) -> list[subprocess.Popen]:
    """One delayed py-spy recorder per process (none when py-spy is absent): collapsed stacks
    in out/pyspy-<name>-<pid>.txt."""
    spy = _py_spy()
    if spy is None:
        print("py-spy not found: no profiles", flush=True)
        return []
    procs = []
    for name, pid in pids.items():
        dest = out / f"pyspy-{name}-{pid}.txt"
        procs.append(subprocess.Popen(
            ["sh", "-c", f"sleep {delay}; exec {spy} record --nonblocking -r 100 -d {seconds} -f raw -o {dest} -p {pid}"],
            stdout=subprocess.DEVNULL, stderr=(out / f"pyspy-{name}-{pid}.err").open("w")))
    return procs


def profile_stages(stack_pid: int, seconds: int, out: Path) -> list[subprocess.Popen]:
    """Profile every child of the launcher (each stage process)."""
    children = subprocess.run(["pgrep", "-P", str(stack_pid), "-a"], capture_output=True, text=True).stdout
    pids = {}
    for line in children.splitlines():
        pid, _, cmdline = line.partition(" ")
        stage = cmdline.split("pdserve.cli")[-1].split()
        name = next((w for w in stage if not w.startswith("-") and w not in ("INFO", "DEBUG")), "stage")
        pids[f"{name}-{len(pids)}"] = int(pid)
    return profile_pids(pids, seconds, out)


def bench(url: str, model_dir: Path, data: Path, n: int, out: Path, rate: str, spy_seconds: int = 0) -> dict:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--base-url", url, "--endpoint", "completions",
           "--dataset", "sharegpt", "--dataset-path", str(data), "--tokenizer", str(model_dir),
           "--num-prompts", str(n), "--ignore-eos", "--temperature", "0", "--request-rate", rate,
           "--output-json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    spies = profile_pids({"bench": proc.pid}, spy_seconds, out.parent) if spy_seconds else []
    stdout, stderr = proc.communicate()
    for spy in spies:
        spy.wait(timeout=60)
    print(stdout[-2500:], stderr[-1000:], flush=True)
    return json.loads(out.read_text())["summary"]


def offline(model_dir: Path, work: list[tuple[list[int], int]], device: str, max_seqs: int, max_tokens: int) -> dict:
    """pdserve's offline engine (overlapped steps on CUDA) on token-id prompts."""
    from pdserve.offline_engine import OfflineEngine, make_request
    from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
    from protocol.sampling import SamplingParams

    engine = OfflineEngine(ModelSettings(model=str(model_dir), load_format="dummy", device=device, seed=7),
                           CacheSettings(), SchedulerSettings(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens))

    def requests(tag: str, items):
        return [make_request(f"{tag}{i}", ids, SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0), [])
                for i, (ids, o) in enumerate(items)]

    engine.generate(requests("w", work[:8]))
    steps0 = engine.num_steps
    start = time.perf_counter()
    res = engine.generate(requests("s", work))
    seconds = time.perf_counter() - start
    out_tokens = sum(len(r.token_ids) for r in res)
    result = {"seconds": seconds, "output_tokens": out_tokens, "output_throughput": out_tokens / seconds,
              "total_throughput": (out_tokens + sum(len(ids) for ids, _ in work)) / seconds,
              "steps": engine.num_steps - steps0}
    del engine
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    return result


def hf_generate_batch(model_dir: Path, work: list[tuple[list[int], int]], out: Path, device: str, timeout: int) -> dict:
    """transformers' continuous batching on the same token ids, in its own process. Each of its
    (at most two) attempts waits a third of `timeout` for its results, so a slow or stuck run still
    writes its JSON (statuses, errors, `valid`) before this process gives up on it."""
    wl = out.with_suffix(".workload.json")
    wl.write_text(json.dumps({"prompts": [ids for ids, _ in work], "output_lens": [o for _, o in work]}))
    cmd = [sys.executable, str(Path(__file__).with_name("hf_generate_batch.py")), str(model_dir), str(wl), str(out),
           "--device", device, "--timeout", str(max(30, timeout // 3))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout} s"}
    if done.returncode != 0 or not out.exists():
        return {"error": (done.stdout + done.stderr)[-2000:]}
    return json.loads(out.read_text())


def random_work(n: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(prompt_len)], output_len) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--phases", default="stack,offline,hf", help="stack, offline, hf (comma-separated)")
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--random-prompts", type=int, default=1000, help="offline random 1024 in / 128 out")
    p.add_argument("--rates", default="4,16,32", help="Poisson rates after the all-at-once run ('' for none)")
    p.add_argument("--loads", default="sharegpt,random", help="offline/hf loads: sharegpt, random")
    p.add_argument("--rate-prompts", type=int, default=160)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--profile-seconds", type=int, default=0)
    p.add_argument("--hf-timeout", type=int, default=360)
    p.add_argument("--hf-prompts", type=int, default=0,
                   help="give transformers only the first N requests of each load (0: all); the offline "
                        "phase then also runs those N, so both engines have a figure on the same requests")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama-3.1-8b", help="tests/benchmarks/synthetic_model.py shape")
    p.add_argument("--work", default="/tmp/pdserve-gpu-serving")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(args.shape, work / args.shape)
    data = work / "sharegpt_like.json"
    kept = sharegpt_like(data, args.num_prompts, seed=0)
    report_path = out / "gpu_serving.json"
    report: dict = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "requests": len(kept),
                   "mean_prompt_words": sum(len(p.split()) for p, _ in kept) / len(kept),
                   "mean_output": sum(o for _, o in kept) / len(kept),
                   "flags": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}})
    save = lambda: report_path.write_text(json.dumps(report, indent=2))  # noqa: E731
    if "stack" in phases:
        serve(args, model_dir, data, kept, out, report, save)
    from tokenizer_svc.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    sharegpt = [(tok.encode(p), o) for p, o in kept]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rand = random_work(args.random_prompts, 1024, 128, vocab, seed=1)
    loads = [("sharegpt", sharegpt), ("random_1024_128", rand)]
    subset = [(f"{name}_first{args.hf_prompts}", items[:args.hf_prompts]) for name, items in loads] if args.hf_prompts else []
    if "offline" in phases:
        for name, items in [(f"offline_{n}", i) for n, i in loads + subset]:
            if name.split("_")[1] not in args.loads:
                continue
            report[name] = offline(model_dir, items, args.device, args.max_num_seqs, args.max_num_batched_tokens)
            print(name, json.dumps(report[name]), flush=True)
            save()
    if "hf" in phases:
        for name, items in [(f"hf_{n}", i) for n, i in (subset or loads)]:
            if name.split("_")[1] not in args.loads:
                continue
            report[name] = hf_generate_batch(model_dir, items, out / f"{name}.json", args.device, args.hf_timeout)
            print(name, json.dumps(report[name])[:1500], flush=True)
            save()
    if "all_at_once" in report and "offline_sharegpt" in report:
        report["stack_over_offline"] = report["all_at_once"]["output_throughput"] / report["offline_sharegpt"]["output_throughput"]
        print("stack / offline", report["stack_over_offline"], flush=True)
    save()
    return 0


def serve(args, model_dir: Path, data: Path, kept: list, out: Path, report: dict, save) -> None:
    """`pdserve up --device cuda`, then `pdserve bench`: all at once, then Poisson rates."""
    port = free_port()
    log = out / "stack.log"
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--seed", "7", "--log-stats-interval", "1"]  # stack.log: a 1 s timeline of the run
    cmd = [sys.executable, "-m", "pdserve.cli", "--log-level", "INFO", "up", "--model", str(model_dir),
           "--served-model-name", "m", "--port", str(port), "--device", args.device, "--load-format", "dummy",
           "--tokenizers", "4", "--detokenizers", "4", *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        if not wait_until_ready(url, 300, alive=lambda: proc.poll() is None):
            raise RuntimeError(log.read_text()[-3000:])
        report["ready_seconds"] = time.perf_counter() - t0
        bench(url, model_dir, data, 16, out / "warm.json", "inf")
        spies = profile_stages(proc.pid, args.profile_seconds, out) if args.profile_seconds else []
        report["all_at_once"] = bench(url, model_dir, data, len(kept), out / "bench-all.json", "inf",
                                      args.profile_seconds)
        for spy in spies:
            spy.wait(timeout=60)
        save()
        for rate in filter(None, args.rates.split(",")):
            report[f"rate_{rate}"] = bench(url, model_dir, data, args.rate_prompts, out / f"bench-rate{rate}.json", rate)
            save()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
