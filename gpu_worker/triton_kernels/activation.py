"""SiLU-and-mul for the fused gate/up projection.

gpu_worker.model computes gate and up with one matmul into [T, 2 * intermediate] (gate first,
then up) and takes silu(gate) * up: in torch that is a chunk, a silu kernel that writes a
[T, intermediate] temporary and a multiply that reads it back. One pass reads both halves once
and writes the product once, computed in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import require_unit_last_stride


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """x: [T, 2 * n] (gate | up). Returns silu(x[:, :n]) * x[:, n:] as [T, n] in x's dtype."""
    require_unit_last_stride("x", x)
    rows, width = x.shape
    if width % 2:
        raise ValueError(f"gate/up width {width} is odd")
    n = width // 2
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    if rows == 0:
        return out
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4,
    )
    return out
