"""Binding of paged_decode_attention.c: decode attention read straight from the paged cache."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpu_worker.cpu_kernels.build import load_library

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64,
             _I64, _I64, ctypes.c_float, ctypes.c_int]
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class DecodeBatch:
    """The decode sequences of a step, as the kernel reads them (contiguous int64, CPU), and the
    kernel that attends them."""

    kernel: PagedDecodeKernel
    token_index: torch.Tensor  # [S] row of each sequence's query in the packed batch
    context_lens: torch.Tensor  # [S] tokens in the cache after this step's write
    block_tables: torch.Tensor  # [S, max_blocks]

    @classmethod
    def build(cls, kernel: PagedDecodeKernel, token_index: np.ndarray, context_lens: np.ndarray,
              block_tables: np.ndarray) -> DecodeBatch:
        def as_tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

        return cls(kernel, as_tensor(token_index), as_tensor(context_lens), as_tensor(block_tables))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               out: torch.Tensor) -> None:
        self.kernel(q, k_cache, v_cache, self, scale, out)


class PagedDecodeKernel:
    """Callable decode attention; construction compiles (or finds) the library."""

    def __init__(self, cache_dir: Path, sliding_window: int | None) -> None:
        lib = load_library("paged_decode_attention.c", cache_dir)
        self._fns = {}
        for dtype, name in ((torch.float32, "paged_decode_attention_f32"),
                            (torch.bfloat16, "paged_decode_attention_bf16")):
            fn = getattr(lib, name)
            fn.argtypes = _ARGTYPES
            fn.restype = ctypes.c_int
            self._fns[dtype] = fn
        self.sliding_window = sliding_window or 0

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 batch: DecodeBatch, scale: float, out: torch.Tensor) -> None:
        """q, out: [T, heads, D]; caches [num_blocks, block_size, kv_heads, D]. Writes the rows
        of `out` named by batch.token_index."""
        for t in (q, out):
            if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
                raise ValueError("q and out must be contiguous per token ([T, heads, D] rows)")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("KV caches must be contiguous")
        num_blocks, block_size, kv_heads, dim = k_cache.shape
        status = self._fns[q.dtype](
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            batch.block_tables.data_ptr(), batch.block_tables.stride(0),
            batch.context_lens.data_ptr(), batch.token_index.data_ptr(),
            out.data_ptr(), out.stride(0), batch.token_index.shape[0],
            q.shape[1], kv_heads, dim, block_size, self.sliding_window, scale,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("paged decode attention could not allocate its scratch buffers")
