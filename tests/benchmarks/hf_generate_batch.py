"""transformers' own continuous batching on the same prompts: the offline baseline of issue 8.

    python tests/benchmarks/hf_generate_batch.py MODEL_DIR WORKLOAD.json OUT.json [--device cuda]

WORKLOAD.json is {"prompts": [[token ids], ...], "output_lens": [n, ...]}. The model is built
from MODEL_DIR's config with random bf16 weights (the same shapes pdserve's dummy load uses),
then every request is added to transformers' ContinuousBatchingManager with its own
max_new_tokens and EOS disabled, so both engines generate exactly the same number of tokens.

A fatal error in transformers' generation thread (an OOM, "No requests can be scheduled and no
requests can be offloaded", ...) does not stop the manager's results: every unfinished request
comes back with status FAILED and the tokens it had so far, and `is_finished()` is true for it.
So each result is checked against its own length; the JSON lists the statuses, the short
requests and the thread's errors, and `valid` is true only when every request got exactly its
tokens. A failed attempt on CUDA is retried once with transformers' defaults for sdpa (no CUDA
graphs) and a smaller cache; each attempt is in `attempts`. Only torch and transformers are
imported (it runs on a bare GPU image), in its own process so pdserve's KV cache is not holding
the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

CPU_MAX_BLOCKS = 64  # on CPU transformers sizes the cache (and an [M, N] mask) to the host's RAM


class ErrorLog(logging.Handler):
    """Keeps the first ERROR lines of transformers' ContinuousBatchingLogger (it does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < 5:
            self.lines.append(record.getMessage()[:500])


def cache_blocks(prompts: list[list[int]], lens: list[int], block: int, device: str, asked: int | None) -> int | None:
    """KV blocks to ask for: the flag's, None on CUDA (transformers sizes it to free memory), and on
    CPU enough for the longest request and at most CPU_MAX_BLOCKS (the rest wait their turn)."""
    if asked is not None or not device.startswith("cpu"):
        return asked
    longest = max(math.ceil((len(p) + n) / block) for p, n in zip(prompts, lens)) + 1
    needed = sum(math.ceil((len(p) + n) / block) for p, n in zip(prompts, lens)) + 1
    return max(longest, min(needed, CPU_MAX_BLOCKS))


def tally(results: dict[str, object], asked: dict[str, int]) -> dict:
    """Produced tokens, status counts and the requests that did not get exactly their length."""
    statuses: Counter = Counter()
    wrong, errors = [], Counter()
    for rid, n in asked.items():
        r = results.get(rid)
        status = "MISSING" if r is None else getattr(r.status, "name", str(r.status))
        got = 0 if r is None else len(r.generated_tokens)
        statuses[status] += 1
        if r is not None and r.error:
            errors[str(r.error)[:300]] += 1
        if got != n or status != "FINISHED":
            wrong.append({"id": rid, "asked": n, "got": got, "status": status})
    produced = sum(len(r.generated_tokens) for r in results.values())
    return {"output_tokens": produced, "statuses": dict(statuses), "wrong_requests": len(wrong),
            "failed_requests": statuses.get("FAILED", 0), "wrong_sample": wrong[:5],
            "request_errors": dict(errors.most_common(3))}


def run_manager(model, gen, cb_config, prompts: list[list[int]], lens: list[int], timeout: float) -> dict:
    """All requests through one ContinuousBatchingManager; the clock runs from the first
    add_request to the last result (cache allocation and graph warm-up are before it)."""
    setup = time.perf_counter()
    kwargs = {} if cb_config is None else {"continuous_batching_config": cb_config}
    with model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=5, **kwargs) as manager:
        start = time.perf_counter()
        asked = {f"r{i}": n for i, n in enumerate(lens)}
        for (rid, n), ids in zip(asked.items(), prompts):
            if manager.add_request(ids, request_id=rid, max_new_tokens=n, eos_token_id=-1) is None:
                raise RuntimeError(f"transformers refused request {rid}")
        results: dict = {}
        deadline = start + timeout
        while len(results) < len(asked) and time.perf_counter() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                break  # the thread stopped and its queue is drained: the rest are MISSING
        seconds = time.perf_counter() - start
        timed_out = len(results) < len(asked) and manager.is_running()
        if timed_out:  # fail what is left now rather than generate on behind the next attempt
            manager.stop(block=True, timeout=60, hard_stop=True)
    return {"seconds": seconds, "setup_seconds": start - setup, "timed_out": timed_out, **tally(results, asked)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("workload")
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks (default: transformers sizes it on CUDA; the workload's need, capped, on CPU)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="auto: transformers decides (off for sdpa, whose paged path needs a mask)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the results of one attempt")
    p.add_argument("--no-retry", action="store_true", help="report the first attempt even if requests failed")
    args = p.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    work = json.loads(Path(args.workload).read_text())
    prompts, lens = work["prompts"], work["output_lens"]
    errors = ErrorLog()
    logging.getLogger("ContinuousBatchingLogger").addHandler(errors)
    config = AutoConfig.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=max(lens), do_sample=False, eos_token_id=-1, pad_token_id=0)
    block = ContinuousBatchingConfig()
    block = getattr(block, "page_size", None) or block.block_size  # 5.24 renamed block_size to page_size
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    settings = [{"max_batch_tokens": args.max_batch_tokens, "use_cuda_graph": graphs,
                 "num_blocks": cache_blocks(prompts, lens, block, args.device, args.num_blocks)}]
    if args.device.startswith("cuda") and not args.no_retry:
        settings.append({**settings[0], "use_cuda_graph": False, "max_memory_percent": 0.6})

    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "requests": len(prompts),
                    "asked_tokens": sum(lens), "path": "ContinuousBatchingManager, per-request max_new_tokens",
                    "attempts": []}
    warm = min(8, len(prompts))
    for s in settings:
        errors.lines.clear()
        cb = ContinuousBatchingConfig(**s)
        run_manager(model, gen, cb, prompts[:warm], [8] * warm, args.timeout)  # kernels, graphs, allocator
        attempt = {"settings": s, **run_manager(model, gen, cb, prompts, lens, args.timeout),
                   "thread_errors": list(errors.lines)}
        attempt["valid"] = attempt["output_tokens"] == report["asked_tokens"] and attempt["wrong_requests"] == 0
        report["attempts"].append(attempt)
        print(json.dumps(attempt)[:1500], flush=True)
        if attempt["valid"] or attempt["timed_out"]:
            break
        gc.collect()  # the failed manager's cache, before the next one sizes itself to free memory
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    best = next((a for a in report["attempts"] if a["valid"]), report["attempts"][-1])
    report.update({k: best[k] for k in ("seconds", "output_tokens", "wrong_requests", "failed_requests", "statuses",
                                        "valid")},
                  batching=best["settings"], output_throughput=best["output_tokens"] / best["seconds"],
                  how=f"{report['path']}, attempt {report['attempts'].index(best) + 1} of {len(report['attempts'])}")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "attempts"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
