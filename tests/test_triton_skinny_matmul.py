"""The skinny (decode-step) matrix product against torch, on the CPU through Triton's interpreter.

float32 with ieee dots, so the only difference from torch is the order of the additions (the K
split included); outputs are poisoned with NaN first so an unwritten element shows. The device
script tests/benchmarks/gpu_gemm.py repeats the check in bf16 on CUDA and times it.
"""

from __future__ import annotations

import pytest
import torch

from tests import triton_interpreter
from tests.triton_interpreter import skinny_matmul

_interpret = triton_interpreter._interpret  # autouse: the interpreter, with its bf16 corrected


@pytest.mark.parametrize(
    "m, n, k, block_n, block_k, split",
    [
        (1, 64, 128, 64, 128, 1),  # one program
        (3, 100, 200, 32, 64, 1),  # ragged N and K, masked tails
        (16, 96, 384, 32, 64, 3),  # K split evenly
        (5, 70, 300, 64, 64, 4),  # ragged K over splits: 4 shares of 128, the last one short
        (17, 40, 256, 32, 64, 8),  # M above one 16-row pad; split larger than the tiles allow
    ],
)
def test_skinny_matmul_equals_torch(m, n, k, block_n, block_k, split):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    out = torch.full((m, n), float("nan"))
    got = skinny_matmul(x, w, out=out, block_n=block_n, block_k=block_k, split=split, num_stages=1)
    assert got is out
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-4)


def test_a_strided_input_row_and_an_output_view_are_honoured():
    """x may be a view with a row stride (a slice of a packed activation), out a column slice."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(4, 160, generator=gen)
    x = base[:, :128]
    w = torch.randn(48, 128, generator=gen)
    wide = torch.full((4, 80), float("nan"))
    skinny_matmul(x, w, out=wide[:, 16:64], block_n=32, block_k=64, split=2, num_stages=1)
    torch.testing.assert_close(wide[:, 16:64], x @ w.T, rtol=1e-5, atol=1e-4)
    assert torch.isnan(wide[:, :16]).all() and torch.isnan(wide[:, 64:]).all()


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="columns"):
        skinny_matmul(torch.zeros(2, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="contiguous"):
        skinny_matmul(torch.zeros(8, 2).T, torch.zeros(4, 8))


def test_a_linear_runs_the_skinny_kernel_in_the_buckets_chosen_for_it(monkeypatch):
    """gpu_worker.matmul_tuning hands a Linear its per-bucket choices; other row counts (and
    anything past 64 rows) stay with F.linear."""
    from gpu_worker import triton_kernels
    from gpu_worker.linear import Linear
    from gpu_worker.matmul_tuning import BUCKETS, SkinnyConfig, bucket_of

    assert [bucket_of(r) for r in (1, 2, 3, 5, 16, 17, 64, 65)] == [1, 2, 4, 8, 16, 32, 64, None]
    assert BUCKETS[-1] == 64
    calls = []
    real = triton_kernels.skinny_matmul.skinny_matmul

    def counted(x, w, **kw):
        calls.append((x.shape[0], kw["split"]))
        return real(x, w, **kw)

    monkeypatch.setattr(triton_kernels.skinny_matmul, "skinny_matmul", counted)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=gen)
    op = Linear(w, None, pack=False)
    op.small_batch = {4: SkinnyConfig(32, 64, 4, 1, 2)}
    for rows in (3, 4, 2, 70):
        x = torch.randn(rows, 128, generator=gen)
        torch.testing.assert_close(op(x), x @ w.T, rtol=1e-5, atol=1e-4)
    assert calls == [(3, 2), (4, 2)]  # 3 and 4 rows share bucket 4; 2 rows and 70 rows do not
