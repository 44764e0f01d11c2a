"""The Triton device check's correctness part (gpu_kernels.py, beside this file): every kernel
against its torch reference over random shapes, on CUDA, each case recorded in the report."""

from __future__ import annotations

import torch

from gpu_worker import triton_kernels as tk
from gpu_worker.triton_kernels import reference as ref
from tests.benchmarks.gpu_kernel_common import (
    DEV,
    DTYPE_NAME,
    Report,
    cdiv,
    nan_like,
    paged_cache,
    pick,
    randint,
)


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


def check_rotary_kv_write(rep: Report, gen: torch.Generator, dtype: torch.dtype, tokens: int, group: int,
                          kv_heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor, page: int = 16) -> None:
    """The fused rotary + KV write against rotary then write, into a NaN cache with skipped slots."""
    q_size, kv_size = group * kv_heads * dim, kv_heads * dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen, device=DEV).to(dtype)
    q = qkv[:, :q_size].view(tokens, group * kv_heads, dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, dim)
    v = qkv[:, q_size + kv_size :].view(tokens, kv_heads, dim)
    pos = torch.randint(0, cos.shape[0], (tokens,), generator=gen, device=DEV)
    num_blocks = cdiv(tokens, page) + 10
    slots = torch.randperm(num_blocks * page, generator=gen, device=DEV)[:tokens]
    slots[torch.rand(tokens, generator=gen, device=DEV) < 0.1] = -1
    want_q, want_k = ref.rotary_embedding(q.float(), k.float(), pos, cos.float(), sin.float())
    k_want = torch.full((num_blocks, page, kv_heads, dim), float("nan"), device=DEV)
    v_want = k_want.clone()
    ref.write_kv_cache(want_k, v.float(), k_want, v_want, slots)
    k_cache = torch.full((num_blocks, page, kv_heads, dim), float("nan"), dtype=dtype, device=DEV)
    v_cache = k_cache.clone()
    case = f"tokens={tokens} q_heads={group * kv_heads} kv_heads={kv_heads} d={dim} page={page} fused qkv"
    try:
        tk.rotary_and_write_kv(q, k, v, k_cache, v_cache, pos, slots, cos, sin)
        rep.check("rotary_kv_write", case + " (q)", q, want_q, dtype)
        for name, got, want in (("k cache", k_cache, k_want), ("v cache", v_cache, v_want)):
            if not torch.equal(got.isnan(), want.isnan()):
                rep.fail("rotary_kv_write", f"{case} ({name})", "wrote other slots than the valid tokens'")
            else:
                rep.check("rotary_kv_write", f"{case} ({name})", got.nan_to_num(), want.nan_to_num(), dtype)
    except Exception as exc:  # noqa: BLE001
        rep.fail("rotary_kv_write", case, repr(exc))


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
            check_rotary_kv_write(rep, gen, dtype, tokens, group, kv_heads, dim, cos, sin)
        for rows, inter in [(1, 1536), (100, 4864), (1024, 14336)]:
            x = (2 * torch.randn(rows, 2 * inter, generator=gen, device=DEV)).to(dtype)
            case = f"rows={rows} intermediate={inter}"
            try:
                out = tk.silu_and_mul(x, out=torch.full((rows, inter), float("nan"), dtype=dtype, device=DEV))
                rep.check("silu_and_mul", case, out, ref.silu_and_mul(x.float()), dtype)
            except Exception as exc:  # noqa: BLE001
                rep.fail("silu_and_mul", case, repr(exc))
