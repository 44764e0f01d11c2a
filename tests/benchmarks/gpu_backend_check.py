"""Device check of the model backends (a script for the lent GPU machine, not a test).

    python tests/benchmarks/gpu_backend_check.py --out DIR [--parts a,b,c] [--requests 500]

a. Greedy equality with transformers: small random Llama and Qwen2 configs built by
   transformers (its own random init, std 0.1), saved as safetensors and loaded into pdserve;
   8 prompts of 5..300 tokens, 24 greedy tokens each, submitted together (chunked prefill and
   decode batches mixed). pdserve's triton backend with and without CUDA graphs and its torch
   backend, in float32 and bfloat16, against transformers in float32 (one prompt at a time).
   A divergence counts as a near-tie when the reference's top-2 logit margin at that step is
   under TIE (float32 1e-3, bfloat16 0.25 logits); every divergence is listed with its margin.
   transformers' own bfloat16 run is compared the same way, as the yardstick.
b. Decode step time, Llama-3.1-8B shapes with dummy bf16 weights: batch 1/16/64/256 x context
   512/2048, one executor call (host packing, copies, forward, logits of every row) synchronised,
   median of 20, for the torch backend, triton eager and triton + CUDA graphs over the same
   weights and cache. Floor = (weight bytes + KV bytes read) / device-to-device copy bandwidth
   (read + write bytes of a 4 GiB copy, measured here). For the graphs also the replay alone
   (CUDA events) and, at context 2048, a torch.profiler breakdown of device time by kernel kind.
c. Offline throughput (pdserve.offline_engine.OfflineEngine): N random 1024-token prompts, 128
   greedy output tokens each (ignore_eos), max_num_seqs 256, token budget 8192: triton + graphs
   against torch.

Writes DIR/gpu_backend_check.json after each part; prints short tables last.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu_worker.backends.executor import EagerExecutor  # noqa: E402
from gpu_worker.backends.torch_backend import TorchBackend  # noqa: E402
from gpu_worker.device_timing import graph_replay_seconds  # noqa: E402
from gpu_worker.runner import ModelRunner  # noqa: E402
from gpu_worker.step_inputs import step_inputs_from_arrays  # noqa: E402
from pdserve.offline_engine import OfflineEngine, make_request  # noqa: E402
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

DEV = torch.device("cuda")
TIE = {"float32": 1e-3, "bfloat16": 0.25}
NEW_TOKENS = 24


# ------------------------------------------------------------------ a. transformers equality

def hf_dir(kind: str, root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(11 if kind == "llama" else 12)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=32, rope_theta=10000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False))
    with torch.no_grad():  # transformers' init leaves biases zero and norms one: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = root / kind
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_reference(path: Path, prompts: list[list[int]], dtype: torch.dtype) -> tuple[list, list]:
    """Greedy tokens and, per step, the top-2 margin of the raw logits (one prompt at a time)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(DEV).eval()
    tokens, margins = [], []
    for p in prompts:
        out = model.generate(torch.tensor([p], device=DEV), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        tokens.append(out.sequences[0, len(p):].tolist())
        top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    del model
    torch.cuda.empty_cache()
    return tokens, margins


def compare(got: list[list[int]], want: list[list[int]], margins: list[list[float]], tie: float) -> dict:
    exact = near = real = 0
    where = []
    for g, w, m in zip(got, want, margins):
        first = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if first is None and len(g) == len(w):
            exact += 1
            continue
        first = min(len(g), len(w)) if first is None else first
        margin = m[first] if first < len(m) else float("nan")
        near += margin < tie
        real += not margin < tie
        where.append({"step": first, "ref_margin": round(margin, 5)})
    return {"exact": exact, "near_tie": int(near), "mismatch": int(real), "divergences": where}


def part_a(report: dict) -> None:
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp())
    lengths = [5, 17, 33, 64, 100, 160, 230, 300]
    results = {}
    for kind in ("llama", "qwen2"):
        path = hf_dir(kind, root)
        prompts = [rng.integers(3, 1024, n).tolist() for n in lengths]
        want, margins = hf_reference(path, prompts, torch.float32)
        hf_bf16, _ = hf_reference(path, prompts, torch.bfloat16)
        results[f"{kind}/transformers-bf16"] = compare(hf_bf16, want, margins, TIE["bfloat16"])
        for dtype in ("float32", "bfloat16"):
            for backend, eager in (("triton", False), ("triton", True), ("torch", True)):
                name = f"{kind}/{dtype}/{backend}{'' if eager else '+graphs'}"
                engine = OfflineEngine(
                    ModelSettings(model=str(path), device="cuda", dtype=dtype, attention_backend=backend,
                                  enforce_eager=eager),
                    CacheSettings(num_kv_blocks=1024), SchedulerSettings(max_num_batched_tokens=256, max_num_seqs=16))
                greedy = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
                done = engine.generate([make_request(f"p{i}", p, greedy, [2]) for i, p in enumerate(prompts)])
                results[name] = compare([c.token_ids for c in done], want, margins, TIE[dtype])
                replays = getattr(engine.runner.executor, "replays", None)
                results[name]["graph_replays"] = replays
                print(name, {k: v for k, v in results[name].items() if k != "divergences"}, flush=True)
                del engine
                gc.collect()
                torch.cuda.empty_cache()
    report["a_greedy_vs_transformers"] = results


# ------------------------------------------------------------------ b. decode step times

def copy_bandwidth() -> float:
    """Bytes read + written per second of a 4 GiB device-to-device copy (median of 10)."""
    src = torch.randn(2**29, device=DEV, dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**31 / statistics.median(times[2:])


def decode_step(runner: ModelRunner, batch: int, context: int, rng: np.random.Generator):
    per_seq = -(-context // runner.block_size)
    blocks = 1 + rng.permutation(runner.num_kv_blocks - 1)[: batch * per_seq]
    tables = blocks.reshape(batch, per_seq).astype(np.int64)
    return step_inputs_from_arrays(
        rng.integers(0, runner.vocab_size, batch), np.full(batch, context - 1, dtype=np.int64),
        np.ones(batch, dtype=np.int64), tables, runner.block_size, np.arange(batch, dtype=np.int64))


def time_executor(executor, step, iters: int = 20) -> float:
    for _ in range(3):
        executor.forward(step).argmax(-1)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        executor.forward(step).argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def replay_time(executor, step, iters: int = 20) -> float:
    """Device time of the captured graph alone (no host packing or copies), CUDA events."""
    executor.forward(step)  # stages this step's inputs into the graph's buffers
    graph = executor.graphs[min(b for b in executor.sizes if b >= step.num_seqs)]
    return graph_replay_seconds(graph, iters, warmup=3)


KERNEL_KINDS = (("attention", ("decode_split", "decode_reduce", "prefill")), ("rms_norm", ("rms_norm",)),
                ("rotary_kv_write", ("rotary_kv_write",)), ("rotary", ("rotary",)), ("kv_write", ("kv_write",)),
                ("silu_mul", ("silu_and_mul",)),
                ("matmul", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "xmma", "cublas", "skinny_matmul",
                            "sum_splits")),
                ("sampling", ("argmax", "softmax", "sort", "topk", "gumbel")), ("copy", ("memcpy", "memset")))


def kernel_profile(executor, step, iters: int = 5) -> dict:
    """Per step: device time by kernel kind (torch.profiler, CUDA kernels only) against the wall."""
    from torch.profiler import ProfilerActivity, profile

    executor.forward(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            executor.forward(step).argmax(-1)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / iters
    kinds, count = device_time_by_kind(prof, iters)
    busy = sum(kinds.values())
    return {"wall_ms": wall * 1e3, "kernel_ms": busy, "idle_ms": wall * 1e3 - busy,
            "kernels_per_step": count / iters, "by_kind_ms": {k: round(v, 4) for k, v in sorted(kinds.items())}}


def device_time_by_kind(prof, steps: int) -> tuple[dict[str, float], int]:
    """A torch.profiler run's CUDA events (kernels, copies, memsets): milliseconds per step by
    KERNEL_KINDS, and the number of events."""
    from torch.autograd import DeviceType

    kinds: dict[str, float] = {}
    count = 0
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        name = e.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / steps
        count += 1
    return kinds, count


def synthetic_dir(root: Path) -> Path:
    out = root / "llama-3.1-8b"
    subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic_model.py"), "llama-3.1-8b", str(out)],
                   check=True, capture_output=True)
    return out


def part_b(report: dict, model_dir: Path) -> None:
    bandwidth = copy_bandwidth()
    start = time.perf_counter()
    runner = ModelRunner(ModelSettings(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16"),
                         CacheSettings(), 8192, 256)
    setup = time.perf_counter() - start
    with torch.no_grad():
        runner.kv_cache.normal_()  # never time on zeros
    cfg = runner.config
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weights -= runner.model.embed.numel() * runner.model.embed.element_size()  # only B rows are read
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    executors = {
        "torch": EagerExecutor(runner.model, TorchBackend(DEV, cfg.num_attention_heads // cfg.num_key_value_heads, None),
                               runner.kv_caches, DEV),
        "triton_eager": runner.executor.eager,
        "triton_graphs": runner.executor,
    }
    rng = np.random.default_rng(0)
    rows = []
    for context in (512, 2048):
        for batch in (1, 16, 64, 256):
            step = decode_step(runner, batch, context, rng)
            floor = (weights + batch * context * kv_per_token) / bandwidth
            row = {"batch": batch, "context": context, "floor_ms": floor * 1e3}
            for name, ex in executors.items():
                row[f"{name}_ms"] = time_executor(ex, step) * 1e3
            row["graph_vs_floor"] = row["triton_graphs_ms"] / row["floor_ms"]
            row["replay_only_ms"] = replay_time(runner.executor, step) * 1e3
            if context == 2048 and batch in (1, 16, 256):
                try:
                    row["profile"] = kernel_profile(runner.executor, step)
                except Exception as exc:  # the timings above stand without it
                    row["profile"] = repr(exc)
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    report["b_decode_steps"] = {"copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes_read": weights,
                                "kv_bytes_per_token": kv_per_token, "num_kv_blocks": runner.num_kv_blocks,
                                "runner_setup_s": setup, "graph_replays": runner.executor.replays, "rows": rows}
    del runner, executors
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ c. offline throughput

def part_c(report: dict, model_dir: Path, num_requests: int) -> None:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 120000, 1024).tolist() for _ in range(num_requests)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    results = {}
    for backend, eager in (("triton", False), ("torch", True)):
        start = time.perf_counter()
        engine = OfflineEngine(ModelSettings(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                             attention_backend=backend, enforce_eager=eager),
                               CacheSettings(), SchedulerSettings(max_num_seqs=256, max_num_batched_tokens=8192))
        setup = time.perf_counter() - start
        engine.generate([make_request("warm", prompts[0][:64], SamplingParams(max_tokens=4), [128001])])
        steps0 = engine.num_steps
        start = time.perf_counter()
        done = engine.generate([make_request(f"r{i}", p, params, [128001]) for i, p in enumerate(prompts)])
        secs = time.perf_counter() - start
        out_tokens = sum(len(c.token_ids) for c in done)
        name = f"{backend}{'' if eager else '+graphs'}"
        results[name] = {"seconds": secs, "output_tokens": out_tokens, "output_tok_s": out_tokens / secs,
                         "total_tok_s": (out_tokens + 1024 * num_requests) / secs, "steps": engine.num_steps - steps0,
                         "setup_s": setup, "num_kv_blocks": engine.runner.num_kv_blocks,
                         "graph_replays": getattr(engine.runner.executor, "replays", None)}
        print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
        del engine, done
        gc.collect()
        torch.cuda.empty_cache()
    report["c_offline_throughput"] = {"requests": num_requests, "input_len": 1024, "output_len": 128, **results}


def main() -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--requests", type=int, default=500)
    args = p.parse_args()
    import triton

    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    out = Path(args.out) / "gpu_backend_check.json"
    parts = args.parts.split(",")
    model_dir = synthetic_dir(Path(tempfile.mkdtemp())) if {"b", "c"} & set(parts) else None
    for part in parts:
        start = time.perf_counter()
        try:
            {"a": lambda: part_a(report), "b": lambda: part_b(report, model_dir),
             "c": lambda: part_c(report, model_dir, args.requests)}[part]()
        except Exception as exc:  # keep the other parts' results
            import traceback

            traceback.print_exc()
            report[f"{part}_error"] = repr(exc)
        report[f"{part}_seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("a_")}, indent=1))
    for name, r in report.get("a_greedy_vs_transformers", {}).items():
        print(f"{name:34s} exact {r['exact']}/8 near-tie {r['near_tie']} mismatch {r['mismatch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
