"""The Triton device check's timing part (gpu_kernels.py, beside this file): each kernel against
the plain-torch way at Llama-3.1-8B shapes, eager and as CUDA-graph replays, plus tile sweeps."""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench, do_bench_cudagraph

from gpu_worker import triton_kernels as tk
from gpu_worker.triton_kernels import reference as ref
from gpu_worker.triton_kernels.decode_attention import choose_num_splits
from tests.benchmarks.gpu_kernel_common import DEV, Report, cdiv


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


DECODE_TILE_SHAPES = ((16, 512), (64, 512), (256, 512), (16, 2048), (256, 2048))


def time_decode_tiles(rep: Report, bw: float, shapes=DECODE_TILE_SHAPES) -> None:
    """Decode attention's tile, warp, pipeline-stage and split choices at the (batch, context)
    shapes the engine serves, as CUDA-graph replays over enough KV sets to defeat the L2 cache
    (device time, as a captured decode step sees it)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, context in shapes:
        kv_bytes = 2 * batch * context * 8 * 128 * 2
        sets = max(2, min(64, cdiv(256 * 2**20, kv_bytes)))
        k, v, table_sets = llama_cache(batch, context, sets=sets)
        q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
        ctx = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        out = torch.empty_like(q)
        default = choose_num_splits(batch, 8, context, sms)
        for splits in sorted({default, max(1, default // 2), default * 2}):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        try:
                            t = graph_bench([
                                (lambda t=t: tk.paged_decode_attention(
                                    q, k, v, t, ctx, 128**-0.5, num_splits=splits, out=out, block_n=block_n,
                                    num_warps=warps, num_stages=stages))
                                for t in table_sets])
                        except Exception as exc:  # noqa: BLE001 (e.g. past the shared memory)
                            t = repr(exc)[:200]
                        rep.data["sweeps"].append({
                            "kernel": "decode_tiles", "case": f"batch={batch} ctx={context}", "num_splits": splits,
                            "default_splits": default, "block_n": block_n, "num_warps": warps,
                            "num_stages": stages, "graph_ms": t, "floor_ms": kv_bytes / bw * 1e3})
            print(f"decode tiles batch={batch} ctx={context}: swept splits around {default}", flush=True)
        del k, v, table_sets


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

        def rotary_then_write():  # the two launches the fused kernel replaces
            tk.rotary_embedding_(q, k, pos, cos, sin)
            tk.write_kv_cache(k, value, k_cache, v_cache, slots)

        # "torch" column: the two Triton launches, not torch
        small_timing(rep, "rotary_kv_write", f"tokens={tokens} 32q+8kv heads, fused vs two launches",
                     lambda: tk.rotary_and_write_kv(q, k, value, k_cache, v_cache, pos, slots, cos, sin),
                     rotary_then_write)

        gu = torch.randn(tokens, 2 * 14336, device=DEV, dtype=bf)
        small_timing(rep, "silu_and_mul", f"tokens={tokens} inter=14336",
                     lambda: tk.silu_and_mul(gu), lambda: ref.silu_and_mul(gu))
