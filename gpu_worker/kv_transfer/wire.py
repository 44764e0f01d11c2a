"""How KV blocks look on the wire, and the checks a destination runs on what arrives.

A chunk is `kv_cache[:, :, ids]` as one C-contiguous numpy array, [layers, 2, n, block_size,
kv_heads, head_dim]. The protocol's codec carries numpy dtypes only, so bfloat16 travels as its
raw 16-bit pattern (int16) and is viewed back on receipt: no conversion, no precision lost. A
receiver checks dtype and shape against its own cache before writing a single byte, because two
workers that disagree on the layout would otherwise corrupt each other's KV silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class KVLayoutMismatch(ValueError):
    """Blocks that arrived do not fit the destination cache (dtype or shape)."""


def wire_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a cache of `dtype` travels as (bfloat16 as its int16 bit pattern)."""
    if dtype == torch.bfloat16:
        return np.dtype(np.int16)
    return torch.empty(0, dtype=dtype).numpy().dtype


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ...: the name KVLayout and KVIpcHandle use."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise KVLayoutMismatch(f"unknown torch dtype {name!r}")
    return dtype


def block_bytes(kv_cache: torch.Tensor) -> int:
    """Bytes of one block across all layers, K and V."""
    return kv_cache[:, :, 0].numel() * kv_cache.element_size()


def blocks_per_chunk(kv_cache: torch.Tensor, chunk_bytes: int) -> int:
    """How many blocks make a chunk of about `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // max(1, block_bytes(kv_cache)))


def to_wire(blocks: torch.Tensor) -> np.ndarray:
    """A CPU, contiguous gathered block tensor as the array a KVChunk carries (no copy)."""
    assert blocks.device.type == "cpu" and blocks.is_contiguous()
    if blocks.dtype == torch.bfloat16:
        blocks = blocks.view(torch.int16)
    return blocks.numpy()


def from_wire(data: np.ndarray, kv_cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The received array as a CPU tensor of the cache's dtype, after checking it fits.

    Raises KVLayoutMismatch naming both layouts when dtype or shape differ. The tensor shares
    the received frame's memory, which is read-only: it is only ever read from.
    """
    want_dtype = wire_dtype(kv_cache.dtype)
    want_shape = (*kv_cache.shape[:2], num_blocks, *kv_cache.shape[3:])
    if data.dtype != want_dtype:
        raise KVLayoutMismatch(
            f"blocks arrived as {data.dtype} but this cache holds {dtype_name(kv_cache.dtype)} "
            f"(travelling as {want_dtype})"
        )
    if tuple(data.shape) != want_shape:
        raise KVLayoutMismatch(
            f"blocks arrived with shape {list(data.shape)} but this cache needs {list(want_shape)} "
            "([layers, 2, blocks, block_size, kv_heads, head_dim])"
        )
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor read-only; this one is only read.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(data)
    if kv_cache.dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor


def check_layout(shape: list[int], dtype: str, kv_cache: torch.Tensor) -> None:
    """Raise KVLayoutMismatch unless a source cache of `shape`/`dtype` matches ours but for
    its number of blocks (what a cuda-ipc source announces)."""
    if dtype != dtype_name(kv_cache.dtype):
        raise KVLayoutMismatch(
            f"the source cache holds {dtype} but this cache holds {dtype_name(kv_cache.dtype)}"
        )
    mine = list(kv_cache.shape)
    if len(shape) != len(mine) or shape[:2] != mine[:2] or shape[3:] != mine[3:]:
        raise KVLayoutMismatch(
            f"the source cache has shape {shape} but this cache has {mine}; they must agree "
            "except in the number of blocks (dim 2)"
        )
