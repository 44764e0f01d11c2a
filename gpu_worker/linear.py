"""The model's matrix products, with weights prepacked for oneDNN on CPU.

Decode steps multiply a few dozen rows by every weight matrix: memory-bound work where MKL's
sgemm repacks the weight on each call. oneDNN with the weight reordered once at load time was
2-3x faster here for 16 rows (lm_head 18.9 ms -> 5.7 ms on this 2-core box) and 15-20% faster
for prefill-sized batches, with float32 results equal to ~4e-7 relative. Anywhere else (CUDA,
a torch without oneDNN, other dtypes) it is plain F.linear, except that on CUDA a product of at
most 64 rows may run through cuBLASLt or the Triton skinny kernel where start-up measurements
chose them (gpu_worker.matmul_tuning sets `small_batch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_worker.matmul_tuning import bucket_of

PACK_BATCH_HINT = 16  # oneDNN tunes the packed layout for this many rows; any count works


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """y = x @ weight.T + bias, packed once when `pack` is set (the dense weight can then go)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.bias = bias
        self.packed = pack
        self.small_batch: dict = {}  # rows bucket -> MatmulChoice (gpu_worker.matmul_tuning)
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
            if pack else weight
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        if self.small_batch and x.dim() == 2 and x.stride(-1) == 1:
            choice = self.small_batch.get(bucket_of(x.shape[0]))
            if choice is not None:
                return choice.run(x, self.weight)
        return F.linear(x, self.weight, self.bias)
