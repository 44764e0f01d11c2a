"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

In the model each norm after the first reads `x = residual + sublayer_out` and the layer keeps x
as the next residual: unfused that is an add kernel that writes x, then a norm kernel that reads
it again and makes several more passes (square, mean, scale, weight) in torch. One row per
program does it in a single read and two writes. Rounding follows gpu_worker.model.rms_norm (HF):
the sum is rounded to the model dtype (it is the residual), the norm is computed in float32 from
that rounded value, rounded to the dtype, then multiplied by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_worker.triton_kernels._util import pow2, require_unit_last_stride


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, residual_out):
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block = pow2(n_cols)
    _rms_norm_kernel[(n_rows,)](
        x, x if residual is None else residual, weight, out, out if residual_out is None else residual_out,
        x.stride(0), 0 if residual is None else residual.stride(0),
        out.stride(0), 0 if residual_out is None else residual_out.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 256)),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [rows, hidden]; weight: [hidden]. Returns weight * rmsnorm(x) in x's dtype."""
    require_unit_last_stride("x", x)
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the normed input and the new residual.

    `residual_out` may be `residual` itself (updated in place): each row is read before it is
    written, by the same program.
    """
    require_unit_last_stride("x", x)
    require_unit_last_stride("residual", residual)
    out = torch.empty_like(x) if out is None else out
    new_residual = torch.empty_like(residual) if residual_out is None else residual_out
    _launch(x, residual, weight, eps, out, new_residual)
    return out, new_residual
