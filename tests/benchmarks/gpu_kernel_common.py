"""What the Triton device check (gpu_kernels.py, beside this file) shares between its checks and its
timings: the CUDA device, tolerances, the JSON report, paged caches with NaN where no key lives,
and seeded random picks."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import triton


DEV = torch.device("cuda")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "checks": [],
            "timings": [],
            "sweeps": [],
        }
        self.failures = 0

    def check(self, kernel: str, case: str, out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        unwritten = int(torch.isnan(out).sum())
        err = rel_err(out, expected)
        ok = unwritten == 0 and err < TOLERANCE[dtype]
        self.failures += not ok
        self.data["checks"].append({"kernel": kernel, "case": case, "dtype": DTYPE_NAME[dtype],
                                    "rel_err": err, "nan": unwritten, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {kernel:<14} {DTYPE_NAME[dtype]:<4} rel_err {err:9.2e}"
              f"{'' if not unwritten else f'  {unwritten} NaN'}  {case}", flush=True)

    def fail(self, kernel: str, case: str, message: str) -> None:
        self.failures += 1
        self.data["checks"].append({"kernel": kernel, "case": case, "ok": False, "error": message})
        print(f"FAIL {kernel:<14} {case}: {message}", flush=True)

    def save(self) -> None:
        self.data["failures"] = self.failures
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1))


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.double(), expected.double()
    return float((out - expected).nan_to_num(1e30).norm() / expected.norm().clamp_min(1e-30))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paged_cache(gen, lens, page, kv_heads, dim, dtype, spare=8, pad=3, poison=True):
    """Caches with shuffled block ids (block 0 null) and int32 tables padded with 0; NaN in
    every slot that holds no real key when `poison`."""
    needed = [cdiv(n, page) for n in lens]
    num_blocks = 1 + sum(needed) + spare
    k = torch.randn(num_blocks, page, kv_heads, dim, generator=gen, device=DEV).to(dtype)
    v = torch.randn(num_blocks, page, kv_heads, dim, generator=gen, device=DEV).to(dtype)
    ids = (torch.randperm(num_blocks - 1, generator=gen, device=DEV) + 1).to(torch.int32)
    tables = torch.zeros(len(lens), max(needed + [1]) + pad, dtype=torch.int32, device=DEV)
    real = torch.zeros(num_blocks, page, dtype=torch.bool, device=DEV)
    used = 0
    for s, (n, count) in enumerate(zip(lens, needed)):
        blocks = ids[used : used + count]
        used += count
        tables[s, :count] = blocks
        if n:
            pos = torch.arange(n, device=DEV)
            real[blocks[pos // page].long(), pos % page] = True
    if poison:
        k[~real] = float("nan")
        v[~real] = float("nan")
    return k, v, tables


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def pick(gen: torch.Generator, options: list):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))
