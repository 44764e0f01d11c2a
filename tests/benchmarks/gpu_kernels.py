"""Device check and timings of the Triton kernels (gpu_worker.triton_kernels) on CUDA.

    python tests/benchmarks/gpu_kernels.py --out kernels.json [--quick]

1. Correctness: every kernel against its torch reference (gpu_worker.triton_kernels.reference,
   float32 math, float64 error sums) over random shapes: ragged lengths, shuffled block tables
   with padding, GQA group sizes 1/4/7/8, head_dim 64/128, block sizes 16 and 32, sliding
   windows, split counts, bf16/fp16/fp32. Outputs are poisoned with NaN first and the caches are
   NaN wherever no real key lives, so an unwritten element or a read past a context shows.
   Relative error ||out - ref|| / ||ref|| is printed for every case and asserted (fp32 1e-5,
   fp16 2e-3, bf16 5e-3). A decode launch is also captured in a CUDA graph and replayed with
   new context lengths.
2. Timings (triton.testing.do_bench medians, L2 flushed before each run) of each kernel against
   the plain-torch way of doing the same thing, at Llama-3.1-8B shapes (32 query heads, 8 KV
   heads, head_dim 128, hidden 4096, intermediate 14336, bf16): decode attention at batch
   1/16/64/256 and context 512/2048, with the floor (KV bytes read / device-to-device copy
   bandwidth measured here), then prefill attention, KV write, RMSNorm+residual, rotary and
   SiLU-and-mul; then small sweeps of the decode split count and the prefill tiles (and, with
   --tile-sweep, the decode tiles). Decode and the small kernels are also timed as CUDA-graph
   replays, which leaves out the host's launch cost that an eager call of a few microseconds
   of device work is bound by.

Imports only torch, triton, numpy and gpu_worker.triton_kernels, so it runs on a bare CUDA
image. Exit status 1 when any check fails (after running everything and writing the JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from gpu_worker import triton_kernels as tk  # noqa: E402
from gpu_worker.triton_kernels import reference as ref  # noqa: E402
from gpu_worker.triton_kernels.decode_attention import choose_num_splits  # noqa: E402

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


# ------------------------------------------------------------------ correctness


def check_decode(rep: Report, trials: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(1)
    dgen = torch.Generator(device=DEV).manual_seed(1)
    for trial in range(trials):
        dtype = pick(gen, [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32])
        group, dim, page = pick(gen, [1, 4, 7, 8]), pick(gen, [64, 128]), pick(gen, [16, 16, 32])
        kv_heads = pick(gen, [1, 2, 8])
        window = pick(gen, [None, None, None, randint(gen, 1, 700)])
        splits = pick(gen, [None, 1, 2, 3, 8, 16])
        seqs = randint(gen, 1, 40)
        lens = [pick(gen, [0, 1, page, randint(gen, 1, 300), randint(gen, 1, 3000)]) for _ in range(seqs)]
        k, v, tables = paged_cache(dgen, lens, page, kv_heads, dim, dtype)
        q = torch.randn(seqs, group * kv_heads, dim, generator=dgen, device=DEV).to(dtype)
        ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
        case = (f"seqs={seqs} group={group} kv_heads={kv_heads} d={dim} page={page} window={window} "
                f"splits={splits} max_ctx={max(lens)}")
        try:
            out = tk.paged_decode_attention(q, k, v, tables, ctx, dim**-0.5, window, splits, out=nan_like(q))
            rep.check("decode", case, out, ref.paged_decode_attention(q, k, v, tables, ctx, dim**-0.5, window), dtype)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, the run goes on
            rep.fail("decode", case, repr(exc))


def check_decode_graph(rep: Report) -> None:
    """Capture one decode launch (fixed split count), replay it with other context lengths."""
    gen = torch.Generator(device=DEV).manual_seed(2)
    replays = ([700, 33, 1, 1500], [5, 600, 17, 1499], [0, 1, 16, 2])
    longest = [max(r[s] for r in replays) for s in range(4)]  # the keys each sequence ever has
    k, v, tables = paged_cache(gen, longest, 16, 8, 128, torch.bfloat16)
    q = torch.randn(4, 32, 128, generator=gen, device=DEV).bfloat16()
    ctx = torch.tensor(replays[0], dtype=torch.int32, device=DEV)
    out = nan_like(q)
    try:
        tk.paged_decode_attention(q, k, v, tables, ctx, 128**-0.5, num_splits=8, out=out)  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tk.paged_decode_attention(q, k, v, tables, ctx, 128**-0.5, num_splits=8, out=out)
        for new in replays:
            ctx.copy_(torch.tensor(new, dtype=torch.int32))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            rep.check("decode-graph", f"replay ctx={new}", out,
                      ref.paged_decode_attention(q, k, v, tables, ctx, 128**-0.5), torch.bfloat16)
    except Exception as exc:  # noqa: BLE001
        rep.fail("decode-graph", "capture/replay", repr(exc))


def check_prefill(rep: Report, trials: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(3)
    dgen = torch.Generator(device=DEV).manual_seed(3)
    for trial in range(trials):
        dtype = pick(gen, [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32])
        group, dim, page = pick(gen, [1, 4, 7, 8]), pick(gen, [64, 128]), pick(gen, [16, 16, 32])
        kv_heads = pick(gen, [1, 2, 8])
        window = pick(gen, [None, None, randint(gen, 1, 400)])
        seqs = randint(gen, 1, 12)
        prefix = [pick(gen, [0, 0, 16 * randint(gen, 1, 20), randint(gen, 1, 1500)]) for _ in range(seqs)]
        q_lens = [pick(gen, [0, 1, randint(gen, 1, 64), randint(gen, 1, 700)]) for _ in range(seqs)]
        lens = [p + n for p, n in zip(prefix, q_lens)]
        k, v, tables = paged_cache(dgen, lens, page, kv_heads, dim, dtype)
        starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
        q = torch.randn(int(starts[-1]), group * kv_heads, dim, generator=dgen, device=DEV).to(dtype)
        ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
        case = (f"seqs={seqs} group={group} kv_heads={kv_heads} d={dim} page={page} window={window} "
                f"tokens={int(starts[-1])} max_q={max(q_lens)} max_ctx={max(lens)}")
        try:
            out = tk.paged_prefill_attention(q, k, v, tables, starts, ctx, dim**-0.5, max(q_lens), window,
                                             out=nan_like(q))
            expected = ref.paged_prefill_attention(q, k, v, tables, starts, ctx, dim**-0.5, window)
            rep.check("prefill", case, out, expected, dtype)
        except Exception as exc:  # noqa: BLE001
            rep.fail("prefill", case, repr(exc))


def check_kv_write(rep: Report) -> None:
    gen = torch.Generator(device=DEV).manual_seed(4)
    for dtype, tokens, kv_heads, dim, page in [
        (torch.bfloat16, 1, 8, 128, 16), (torch.bfloat16, 777, 8, 128, 16), (torch.float16, 300, 2, 64, 32),
        (torch.float32, 64, 1, 64, 16), (torch.bfloat16, 4096, 8, 128, 16), (torch.bfloat16, 50, 7, 80, 16),
    ]:
        q_heads = 4 * kv_heads
        num_blocks = cdiv(tokens, page) + 10
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, generator=gen, device=DEV).to(dtype)
        key = qkv[:, q_heads * dim : (q_heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        value = qkv[:, (q_heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        slots = torch.randperm(num_blocks * page, generator=gen, device=DEV)[:tokens]
        slots[torch.rand(tokens, generator=gen, device=DEV) < 0.1] = -1
        k_cache = torch.full((num_blocks, page, kv_heads, dim), float("nan"), dtype=dtype, device=DEV)
        v_cache = k_cache.clone()
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        case = f"tokens={tokens} kv_heads={kv_heads} d={dim} page={page} strided"
        try:
            tk.write_kv_cache(key, value, k_cache, v_cache, slots)
            ref.write_kv_cache(key, value, k_ref, v_ref, slots)
            same = (torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(), v_ref.isnan())
                    and torch.equal(k_cache.nan_to_num(), k_ref.nan_to_num())
                    and torch.equal(v_cache.nan_to_num(), v_ref.nan_to_num()))
            rep.failures += not same
            rep.data["checks"].append({"kernel": "kv_write", "case": case, "dtype": DTYPE_NAME[dtype],
                                       "exact": same, "ok": same})
            print(f"{'ok  ' if same else 'FAIL'} {'kv_write':<14} {DTYPE_NAME[dtype]:<4} exact={same}  {case}")
        except Exception as exc:  # noqa: BLE001
            rep.fail("kv_write", case, repr(exc))


def check_fusions(rep: Report) -> None:
    gen = torch.Generator(device=DEV).manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, hidden in [(1, 576), (37, 896), (300, 4096), (2048, 5120)]:
            x = torch.randn(rows, hidden, generator=gen, device=DEV).to(dtype)
            res = (3 * torch.randn(rows, hidden, generator=gen, device=DEV)).to(dtype)
            w = (1 + 0.1 * torch.randn(hidden, generator=gen, device=DEV)).to(dtype)
            case = f"rows={rows} hidden={hidden}"
            try:
                normed, summed = tk.fused_add_rms_norm(x, res, w, 1e-5, out=nan_like(x), residual_out=nan_like(x))
                want_n, want_s = ref.fused_add_rms_norm(x, res, w, 1e-5)
                rep.check("add_rms_norm", case, normed, want_n, dtype)
                rep.check("add_rms_norm", case + " (residual)", summed, want_s, dtype)
                rep.check("rms_norm", case, tk.rms_norm(x, w, 1e-5, out=nan_like(x)), ref.rms_norm(x, w, 1e-5), dtype)
            except Exception as exc:  # noqa: BLE001
                rep.fail("rms_norm", case, repr(exc))
        for tokens, group, kv_heads, dim in [(1, 4, 8, 128), (333, 7, 2, 64), (2048, 4, 8, 128)]:
            q_size, kv_size = group * kv_heads * dim, kv_heads * dim
            qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen, device=DEV).to(dtype)
            q = qkv[:, :q_size].view(tokens, group * kv_heads, dim)
            k = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, dim)
            pos = torch.randint(0, 8192, (tokens,), generator=gen, device=DEV)
            inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=DEV).float() / dim))
            emb = torch.arange(8192, device=DEV).float()[:, None] * inv[None, :]
            emb = torch.cat((emb, emb), -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            want_q, want_k = ref.rotary_embedding(q.float(), k.float(), pos, cos.float(), sin.float())
            case = f"tokens={tokens} q_heads={group * kv_heads} kv_heads={kv_heads} d={dim} in-place on fused qkv"
            try:
                tk.rotary_embedding_(q, k, pos, cos, sin)
                rep.check("rotary", case + " (q)", q, want_q, dtype)
                rep.check("rotary", case + " (k)", k, want_k, dtype)
            except Exception as exc:  # noqa: BLE001
                rep.fail("rotary", case, repr(exc))
        for rows, inter in [(1, 1536), (100, 4864), (1024, 14336)]:
            x = (2 * torch.randn(rows, 2 * inter, generator=gen, device=DEV)).to(dtype)
            case = f"rows={rows} intermediate={inter}"
            try:
                out = tk.silu_and_mul(x, out=torch.full((rows, inter), float("nan"), dtype=dtype, device=DEV))
                rep.check("silu_and_mul", case, out, ref.silu_and_mul(x.float()), dtype)
            except Exception as exc:  # noqa: BLE001
                rep.fail("silu_and_mul", case, repr(exc))


# ------------------------------------------------------------------ timings


def bench(fn) -> float:
    """Median milliseconds (L2 flushed before every run)."""
    return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))


def graph_bench(fns) -> float:
    """Median device milliseconds per call, host overhead excluded: many calls captured in one
    CUDA graph and replayed, each call the next of `fns` (different memory, so the L2 cache does
    not serve what one call read to the next when the sets together exceed it)."""
    it = itertools.cycle(fns)
    return float(do_bench_cudagraph(lambda: next(it)(), rep=20, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second, over 2 GiB buffers."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * 2**30 / (ms * 1e-3)


def timing(rep: Report, kernel: str, case: str, triton_ms: float, torch_ms: float | None, **extra) -> None:
    row = {"kernel": kernel, "case": case, "triton_ms": triton_ms, "torch_ms": torch_ms,
           "speedup": None if torch_ms is None else torch_ms / triton_ms, **extra}
    rep.data["timings"].append(row)
    more = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    print(f"{kernel:<14} {case:<34} triton {triton_ms * 1e3:9.1f} us   torch "
          f"{'-' if torch_ms is None else f'{torch_ms * 1e3:9.1f} us'}   "
          f"{'' if torch_ms is None else f'x{torch_ms / triton_ms:5.2f}'}  {more}", flush=True)


def llama_cache(batch: int, context: int, page: int = 16, kv_heads: int = 8, dim: int = 128, sets: int = 1):
    """One layer's bf16 K/V for `sets` x `batch` sequences of `context` keys, blocks scattered
    at random; tables [batch, blocks] (sets == 1) or [sets, batch, blocks]."""
    per_seq = cdiv(context, page)
    num_blocks = sets * batch * per_seq + 1
    k = torch.randn(num_blocks, page, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ids = (torch.randperm(num_blocks - 1, device=DEV) + 1).to(torch.int32)
    tables = ids.view(sets, batch, per_seq)
    return k, v, tables[0] if sets == 1 else tables


def time_decode(rep: Report, bw: float, batches, contexts) -> None:
    """Eager (do_bench: L2 flushed, host launch cost included when the GPU waits for it) and
    graph-replayed (device time only, rotating over enough KV sets to exceed the L2 cache)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for context in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * context * 8 * 128 * 2
            sets = max(2, min(128, cdiv(256 * 2**20, kv_bytes)))
            k, v, table_sets = llama_cache(batch, context, sets=sets)
            tables = table_sets[0]
            q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
            ctx = torch.full((batch,), context, dtype=torch.int32, device=DEV)
            out = torch.empty_like(q)
            splits = choose_num_splits(batch, 8, context, sms)
            t_tri = bench(lambda: tk.paged_decode_attention(q, k, v, tables, ctx, 128**-0.5, out=out))
            t_torch = bench(lambda: ref.gather_sdpa_decode(q, k, v, tables, None, 128**-0.5))
            g_tri = graph_bench([
                (lambda t=t: tk.paged_decode_attention(q, k, v, t, ctx, 128**-0.5, num_splits=splits, out=out))
                for t in table_sets])
            g_torch = graph_bench([(lambda t=t: ref.gather_sdpa_decode(q, k, v, t, None, 128**-0.5))
                                   for t in table_sets])
            floor_ms = kv_bytes / bw * 1e3
            timing(rep, "decode", f"batch={batch} ctx={context}", t_tri, t_torch, splits=splits,
                   graph_triton_ms=g_tri, graph_torch_ms=g_torch, floor_ms=floor_ms,
                   graph_vs_floor=g_tri / floor_ms, graph_kv_GBps=kv_bytes / (g_tri * 1e-3) / 1e9)
            if batch in (1, 16, 64) or context == 2048:
                for n in (1, 2, 4, 8, 16, 32):
                    if n * 64 > context:
                        break
                    t = graph_bench([
                        (lambda t=t, n=n: tk.paged_decode_attention(q, k, v, t, ctx, 128**-0.5, num_splits=n, out=out))
                        for t in table_sets])
                    rep.data["sweeps"].append({"kernel": "decode", "case": f"batch={batch} ctx={context}",
                                               "num_splits": n, "graph_ms": t})
            del k, v, tables, table_sets


def time_decode_tiles(rep: Report) -> None:
    for batch, context in [(16, 2048), (256, 2048)]:
        k, v, tables = llama_cache(batch, context)
        q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
        ctx = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        out = torch.empty_like(q)
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3):
                    t = bench(lambda: tk.paged_decode_attention(q, k, v, tables, ctx, 128**-0.5, out=out,
                                                                block_n=block_n, num_warps=warps, num_stages=stages))
                    rep.data["sweeps"].append({"kernel": "decode", "case": f"batch={batch} ctx={context}",
                                               "block_n": block_n, "num_warps": warps, "num_stages": stages, "ms": t})
        del k, v, tables


def torch_prefill(q, k_cache, v_cache, tables, q_len: int, context: int, scale: float):
    """Uniform-length prefill the plain-torch way: gather the blocks, SDPA with a causal mask."""
    batch = tables.shape[0]
    flat = tables.reshape(-1).long()
    keys = k_cache[flat].view(batch, -1, k_cache.shape[2], k_cache.shape[3])[:, :context].transpose(1, 2)
    values = v_cache[flat].view(batch, -1, v_cache.shape[2], v_cache.shape[3])[:, :context].transpose(1, 2)
    qb = q.view(batch, q_len, q.shape[1], q.shape[2]).transpose(1, 2)
    q_pos = torch.arange(context - q_len, context, device=q.device)
    mask = torch.arange(context, device=q.device)[None, :] <= q_pos[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(qb, keys, values, attn_mask=mask, scale=scale,
                                                         enable_gqa=True)
    return o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])


PREFILL_SHAPES = [(1, 0, 2048), (4, 0, 512), (4, 1536, 512), (16, 0, 128), (8, 3968, 128)]  # batch, prefix, q
SMALL_TOKENS = (256, 4096)


def time_prefill(rep: Report, sweep: bool) -> None:
    for batch, prefix, q_len in PREFILL_SHAPES:
        context = prefix + q_len
        k, v, tables = llama_cache(batch, context)
        q = torch.randn(batch * q_len, 32, 128, device=DEV, dtype=torch.bfloat16)
        starts = torch.arange(batch + 1, device=DEV, dtype=torch.int32) * q_len
        ctx = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        out = torch.empty_like(q)
        t_tri = bench(lambda: tk.paged_prefill_attention(q, k, v, tables, starts, ctx, 128**-0.5, q_len, out=out))
        try:
            t_torch = bench(lambda: torch_prefill(q, k, v, tables, q_len, context, 128**-0.5))
        except Exception as exc:  # noqa: BLE001 - report the kernel's time anyway
            print(f"torch prefill failed: {exc!r}")
            t_torch = None
        flops = 4 * batch * 32 * 128 * (q_len * prefix + q_len * (q_len + 1) / 2)
        timing(rep, "prefill", f"batch={batch} prefix={prefix} q={q_len}", t_tri, t_torch,
               tflops=flops / (t_tri * 1e-3) / 1e12)
        if sweep and (batch, prefix) in ((4, 1536), (1, 0)):
            for block_m in (64, 128):
                for block_n in (32, 64):
                    for warps in (4, 8):
                        t = bench(lambda: tk.paged_prefill_attention(
                            q, k, v, tables, starts, ctx, 128**-0.5, q_len, out=out,
                            block_m=block_m, block_n=block_n, num_warps=warps))
                        rep.data["sweeps"].append({"kernel": "prefill", "case": f"batch={batch} prefix={prefix} q={q_len}",
                                                   "block_m": block_m, "block_n": block_n, "num_warps": warps, "ms": t})
        del k, v, tables


def small_timing(rep: Report, kernel: str, case: str, triton_fn, torch_fn) -> None:
    timing(rep, kernel, case, bench(triton_fn), bench(torch_fn),
           graph_triton_ms=graph_bench([triton_fn]), graph_torch_ms=graph_bench([torch_fn]))


def time_small(rep: Report) -> None:
    bf = torch.bfloat16
    for tokens in SMALL_TOKENS:
        # KV write: keys/values as views of the fused QKV output
        qkv = torch.randn(tokens, (32 + 16) * 128, device=DEV, dtype=bf)
        key = qkv[:, 4096:5120].view(tokens, 8, 128)
        value = qkv[:, 5120:].view(tokens, 8, 128)
        num_blocks = cdiv(tokens, 16) * 4
        k_cache = torch.zeros(num_blocks, 16, 8, 128, device=DEV, dtype=bf)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * 16, device=DEV)[:tokens]

        def torch_write():
            k_cache.view(-1, 8, 128).index_copy_(0, slots, key)
            v_cache.view(-1, 8, 128).index_copy_(0, slots, value)

        both = [lambda: tk.write_kv_cache(key, value, k_cache, v_cache, slots), torch_write]
        small_timing(rep, "kv_write", f"tokens={tokens}", *both)

        x = torch.randn(tokens, 4096, device=DEV, dtype=bf)
        res = torch.randn_like(x)
        w = torch.randn(4096, device=DEV, dtype=bf)
        small_timing(rep, "add_rms_norm", f"tokens={tokens} hidden=4096",
                     lambda: tk.fused_add_rms_norm(x, res, w, 1e-5), lambda: ref.fused_add_rms_norm(x, res, w, 1e-5))

        q = qkv[:, :4096].view(tokens, 32, 128)
        k = qkv[:, 4096:5120].view(tokens, 8, 128)
        pos = torch.randint(0, 8192, (tokens,), device=DEV)
        cos = torch.randn(8192, 128, device=DEV, dtype=bf)
        sin = torch.randn(8192, 128, device=DEV, dtype=bf)
        small_timing(rep, "rotary", f"tokens={tokens} 32q+8kv heads",
                     lambda: tk.rotary_embedding_(q, k, pos, cos, sin), lambda: ref.rotary_embedding(q, k, pos, cos, sin))

        gu = torch.randn(tokens, 2 * 14336, device=DEV, dtype=bf)
        small_timing(rep, "silu_and_mul", f"tokens={tokens} inter=14336",
                     lambda: tk.silu_and_mul(gu), lambda: ref.silu_and_mul(gu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="fewer random cases, no sweeps")
    parser.add_argument("--tile-sweep", action="store_true", help="also sweep the decode kernel's tiles and warps")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="skip the decode tile sweep once this many seconds have passed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    assert not {"protocol", "zmq", "msgspec"} & set(sys.modules), "gpu_worker.triton_kernels pulled in the service"
    start = time.perf_counter()
    rep = Report(args.out)
    print(f"{rep.data['device']}  torch {torch.__version__}  triton {triton.__version__}", flush=True)

    def phase(name: str, fn, *a) -> None:
        t0 = time.perf_counter()
        fn(*a)
        torch.cuda.synchronize()
        rep.data.setdefault("phase_seconds", {})[name] = time.perf_counter() - t0
        rep.save()

    phase("check_decode", check_decode, rep, 10 if args.quick else 28)
    phase("check_decode_graph", check_decode_graph, rep)
    phase("check_prefill", check_prefill, rep, 8 if args.quick else 20)
    phase("check_kv_write", check_kv_write, rep)
    phase("check_fusions", check_fusions, rep)
    bw = copy_bandwidth()
    rep.data["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + written)", flush=True)
    phase("time_decode", time_decode, rep, bw, (1, 16, 64, 256), (512, 2048))
    phase("time_prefill", time_prefill, rep, not args.quick)
    phase("time_small", time_small, rep)
    if args.tile_sweep and time.perf_counter() - start < args.budget_s:
        phase("time_decode_tiles", time_decode_tiles, rep)
    rep.data["seconds"] = time.perf_counter() - start
    rep.save()
    print(f"\n{rep.failures} failed checks of {len(rep.data['checks'])}; {rep.data['seconds']:.0f} s; "
          f"JSON in {args.out}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
