"""Small helpers shared by the kernel wrappers."""

from __future__ import annotations

import torch
import triton


def pow2(n: int, floor: int = 1) -> int:
    """The next power of two >= max(n, floor): Triton block shapes must be powers of two."""
    return max(triton.next_power_of_2(int(n)), floor)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs would be rounded to tf32 by a default tl.dot (~3e-4 error): ask for ieee."""
    return "ieee" if dtype == torch.float32 else "tf32"


def require_unit_last_stride(name: str, t: torch.Tensor) -> None:
    """The kernels address rows by strides but read each head_dim row as one contiguous run."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
