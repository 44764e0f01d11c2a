"""The matrix products of a Llama-3.1-8B step on CUDA: which implementation is fastest at which M.

    python tests/benchmarks/gpu_gemm.py --out gemm.json [--quick]

For each weight of a decoder layer (fused QKV, O, fused gate/up, down) and the LM head, and for
M (tokens in the step) from 1 to 8192, times y = x @ w.T in bf16 as

- `cublas`: torch's default F.linear,
- `cublaslt`: the same with torch.backends.cuda.preferred_blas_library("cublaslt"),
- `tunable`: torch's TunableOp, which tries the BLAS libraries' algorithms and keeps the fastest
  (tuned once per shape before timing; skipped where this torch lacks it),
- `skinny` (M <= 64): gpu_worker.triton_kernels.skinny_matmul over a small grid of tiles, warps,
  pipeline stages and K splits, keeping the best (and every config's time).

Each timing is a CUDA-graph replay of 8 products over 8 distinct weight copies (so the L2 cache
holds none of them, as in a real step that reads 32 layers' weights), median of 7 replays,
reported per product with the bytes read per second and the FLOP/s. The skinny kernel's output
is checked against F.linear first (bf16, relative error of the whole output).

Imports only torch, triton, gpu_worker.triton_kernels and gpu_worker.device_timing: runs on a bare CUDA image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu_worker.device_timing import replay_seconds  # noqa: E402
from gpu_worker.triton_kernels.skinny_matmul import skinny_matmul  # noqa: E402

DEV = torch.device("cuda")
SHAPES = {  # name: (N, K) of the [N, K] weight, Llama-3.1-8B
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
COPIES = 8
SKINNY_CONFIGS = [  # (block_n, block_k, num_warps, num_stages)
    (bn, bk, w, s) for bn, bk, w, s in itertools.product((32, 64), (128, 256), (4,), (3, 5))
] + [(128, 64, 8, 3), (16, 256, 4, 4)]


def with_blas(library: str, fn):
    def run(w):
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            return fn(w)
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    return run


def skinny_splits(n: int, k: int, block_n: int, block_k: int) -> list[int]:
    stripes = -(-n // block_n)
    return [s for s in (1, 2, 4, 8, 16) if s * block_k <= k and stripes * s <= 8 * 132]


def measure(name: str, n: int, k: int, m: int, quick: bool, rows: list) -> None:
    weights = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    row: dict = {"weight": name, "N": n, "K": k, "M": m}
    bytes_read = n * k * 2 + m * k * 2 + m * n * 2
    flops = 2 * m * n * k

    def put(impl: str, seconds: float) -> None:
        row[impl] = {"us": seconds * 1e6, "TBps": bytes_read / seconds / 1e12, "TFLOPs": flops / seconds / 1e12}

    put("cublas", replay_seconds(lambda w: F.linear(x, w), weights))
    put("cublaslt", replay_seconds(with_blas("cublaslt", lambda w: F.linear(x, w)), weights))
    if m <= 64:
        want = F.linear(x, weights[0]).float()
        best, tried = None, []
        for bn, bk, warps, stages in SKINNY_CONFIGS[: 4 if quick else None]:
            for split in skinny_splits(n, k, bn, bk):
                out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
                def fn(w, bn=bn, bk=bk, warps=warps, stages=stages, split=split, out=out):
                    return skinny_matmul(x, w, out=out, block_n=bn, block_k=bk, split=split,
                                         num_warps=warps, num_stages=stages)
                try:
                    got = fn(weights[0]).float()
                    err = ((got - want).norm() / want.norm()).item()
                    seconds = replay_seconds(fn, weights)
                except Exception as exc:  # a config the compiler rejects (shared memory)
                    tried.append({"config": [bn, bk, warps, stages, split], "error": repr(exc)[:200]})
                    continue
                tried.append({"config": [bn, bk, warps, stages, split], "us": seconds * 1e6, "rel_err": err})
                if err < 1e-2 and (best is None or seconds < best[0]):
                    best = (seconds, [bn, bk, warps, stages, split], err)
        if best is not None:
            put("skinny", best[0])
            row["skinny"].update(config=best[1], rel_err=best[2])
        row["skinny_tried"] = tried
    if hasattr(torch.cuda, "tunable"):
        tunable = torch.cuda.tunable
        try:
            tunable.enable(True)
            tunable.tuning_enable(True)
            tunable.set_max_tuning_duration(200)
            F.linear(x, weights[0])  # tunes this shape, eagerly (not while capturing)
            torch.cuda.synchronize()
            tunable.tuning_enable(False)
            put("tunable", replay_seconds(lambda w: F.linear(x, w), weights))
        except Exception as exc:
            row["tunable"] = {"error": repr(exc)[:300]}
        finally:
            tunable.enable(False)
    winners = {impl: v["us"] for impl, v in row.items() if isinstance(v, dict) and "us" in v}
    row["fastest"] = min(winners, key=winners.get)
    rows.append(row)
    brief = {impl: round(v, 1) for impl, v in winners.items()}
    print(f"{name:8s} M={m:5d}: {brief} us -> {row['fastest']}", flush=True)
    weights.clear()
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer M values and skinny configs")
    parser.add_argument("--m", default="", help="comma-separated M values (default: 1..8192)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    ms = [int(v) for v in args.m.split(",")] if args.m else (
        [1, 16, 64, 256, 1024] if args.quick else [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    start = time.perf_counter()
    rows: list = []
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    for name, (n, k) in SHAPES.items():
        for m in ms:
            measure(name, n, k, m, args.quick, rows)
            args.out.write_text(json.dumps(report, indent=1))
    report["seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
