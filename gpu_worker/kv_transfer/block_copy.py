"""Copy whole KV blocks from one cache to another: `dst[:, :, dst_ids] = src[:, :, src_ids]`.

Both caches are [layers, 2, num_blocks, block_size, kv_heads, head_dim] of one dtype on one
device; their num_blocks may differ (a source worker's cache and this worker's). One block of one
layer's K or V is a slab of block_size * kv_heads * head_dim contiguous elements, so the Triton
kernel runs one program per (block pair, layer, K/V) that reads its slab once at the source
block and writes it once at the destination block: 2 bytes of memory traffic per byte copied.
The torch fallback (index_select into a scratch tensor, then index_copy_) moves every byte twice
and needs the scratch; it runs where triton is missing, on a CPU cache, and for caches whose
slabs are not contiguous.

triton is imported on first use, not with this module: importing gpu_worker.kv_transfer stays
cheap and works where triton is not installed. The kernel is built for the interpreter or the
compiler as TRITON_INTERPRET says at the time of the call (the tests run it on CPU tensors).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

TRITON = "triton"
TORCH = "torch"
AUTO = "auto"
MAX_TILE_BYTES = 32 << 10  # one program's slab in registers at once: 128 bytes a thread at 8 warps

triton = None  # the modules, once _load_triton() has imported them (the kernel reads `tl`)
tl = None
_triton_missing = False
_kernels: dict[bool, object] = {}  # interpreted or compiled -> the jitted kernel


def _copy_blocks_kernel(
    src_ptr, dst_ptr, ids_ptr, num_pairs,
    src_stride_l, src_stride_kv, src_stride_b,
    dst_stride_l, dst_stride_kv, dst_stride_b,
    SLAB: tl.constexpr, TILE: tl.constexpr, EVEN: tl.constexpr,
):
    """Program (pair, layer * 2 + kv): copy slab `ids[0, pair]` of that layer's K or V to slab
    `ids[1, pair]`. `ids` is [2, num_pairs] int32; each slab is SLAB contiguous elements."""
    pair = tl.program_id(0)
    lkv = tl.program_id(1)
    layer = (lkv // 2).to(tl.int64)
    kv = (lkv % 2).to(tl.int64)
    s = tl.load(ids_ptr + pair).to(tl.int64)
    d = tl.load(ids_ptr + num_pairs + pair).to(tl.int64)
    src = src_ptr + layer * src_stride_l + kv * src_stride_kv + s * src_stride_b
    dst = dst_ptr + layer * dst_stride_l + kv * dst_stride_kv + d * dst_stride_b
    offs = tl.arange(0, TILE)
    for start in range(0, SLAB, TILE):
        if EVEN:
            tl.store(dst + start + offs, tl.load(src + start + offs))
        else:
            inside = start + offs < SLAB
            tl.store(dst + start + offs, tl.load(src + start + offs, mask=inside), mask=inside)


def _load_triton() -> bool:
    """Import triton once; False (and the torch path everywhere) where it is not installed."""
    global triton, tl, _triton_missing
    if triton is not None:
        return True
    if _triton_missing:
        return False
    try:
        import triton as _triton
        import triton.language as _tl
    except ImportError:
        _triton_missing = True
        return False
    triton, tl = _triton, _tl
    return True


def triton_available() -> bool:
    """Whether the Triton kernel can run here at all (triton imports)."""
    return _load_triton()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel():
    """The jitted kernel for the current TRITON_INTERPRET setting (triton decides at decoration
    whether a function is interpreted, so each setting gets its own)."""
    interpret = _interpreting()
    kernel = _kernels.get(interpret)
    if kernel is None:
        kernel = _kernels[interpret] = triton.jit(_copy_blocks_kernel, do_not_specialize=["num_pairs"])
    return kernel


def _slabs_contiguous(cache: torch.Tensor) -> bool:
    """Whether each (layer, K/V, block) is one contiguous run of elements (dims of size 1 may
    have any stride)."""
    expected = 1
    for dim in (5, 4, 3):
        size = cache.shape[dim]
        if size != 1 and cache.stride(dim) != expected:
            return False
        expected *= size
    return True


def check_caches(src: torch.Tensor, dst: torch.Tensor) -> None:
    """ValueError unless src and dst are KV caches that blocks can be copied between."""
    if src.dim() != 6 or dst.dim() != 6:
        raise ValueError(f"KV caches are 6-D [layers, 2, blocks, block_size, kv_heads, head_dim], got "
                         f"{list(src.shape)} and {list(dst.shape)}")
    if src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:] or src.shape[1] != 2:
        raise ValueError(f"KV cache layouts differ beyond num_blocks: {list(src.shape)} -> {list(dst.shape)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"KV cache dtypes differ: {src.dtype} -> {dst.dtype}")
    if src.device != dst.device:
        raise ValueError(f"KV caches on different devices: {src.device} -> {dst.device}")


def _check_ids(name: str, ids: Sequence[int], num_blocks: int) -> None:
    if ids and not (0 <= min(ids) and max(ids) < num_blocks):
        bad = [b for b in ids if not 0 <= b < num_blocks]
        raise ValueError(f"{name} block ids out of range [0, {num_blocks}): {bad[:8]}")


def choose_backend(src: torch.Tensor, dst: torch.Tensor) -> str:
    """What `copy_blocks(..., backend="auto")` runs: the kernel on a CUDA cache with contiguous
    slabs where triton imports, else torch."""
    if dst.is_cuda and _slabs_contiguous(src) and _slabs_contiguous(dst) and _load_triton():
        return TRITON
    return TORCH


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int], *,
    backend: str = AUTO, max_chunk_blocks: int | None = None,
) -> str:
    """dst[:, :, dst_ids] = src[:, :, src_ids], enqueued on the current stream (on CUDA it is not
    complete on return: synchronize or record an event). Returns the backend that ran.

    `dst_ids` must not repeat (which source block would land is unspecified). `backend`: "auto",
    "triton" (also on CPU tensors under TRITON_INTERPRET=1; ValueError where it cannot run) or
    "torch". `max_chunk_blocks` bounds the torch path's scratch (blocks per index_select); the
    kernel needs none. On CUDA both id lists go to the device in one pinned, non-blocking upload.
    """
    check_caches(src, dst)
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    _check_ids("source", src_ids, src.shape[2])
    _check_ids("destination", dst_ids, dst.shape[2])
    if backend == AUTO:
        backend = choose_backend(src, dst)
    if backend not in (TRITON, TORCH):
        raise ValueError(f"unknown block copy backend {backend!r}")
    if not src_ids:
        return backend
    if backend == TRITON:
        if not _load_triton():
            raise ValueError("the triton block copy needs triton, which is not installed")
        if not (_slabs_contiguous(src) and _slabs_contiguous(dst)):
            raise ValueError("the triton block copy needs contiguous [block_size, kv_heads, head_dim] slabs")
        if not (dst.is_cuda or _interpreting()):
            raise ValueError(f"the triton block copy needs a CUDA cache (or TRITON_INTERPRET=1), got {dst.device}")
        _copy_triton(src, dst, upload_ids(src_ids, dst_ids, dst.device, torch.int32))
    else:
        _copy_torch(src, dst, upload_ids(src_ids, dst_ids, dst.device, torch.long), max_chunk_blocks)
    return backend


def upload_ids(src_ids: Sequence[int], dst_ids: Sequence[int], device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Both id lists as one [2, n] tensor on `device`: one host-to-device copy, from pinned memory
    and non-blocking on CUDA (ordered before later work on the current stream; the pinned buffer
    goes back to torch's host cache only once that copy is done)."""
    if device.type != "cuda":
        return torch.tensor([list(src_ids), list(dst_ids)], dtype=dtype, device=device)
    host = torch.tensor([list(src_ids), list(dst_ids)], dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def _launch(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, tile: int | None = None,
            *, warmup: bool = False) -> None:
    """Launch the kernel (or only compile it, `warmup`); `ids` is [2, n] int32 on dst's device.
    `tile` (elements, a power of two) overrides the per-iteration tile, for tests of the loop."""
    num_pairs = ids.shape[1]
    slab = src.shape[3] * src.shape[4] * src.shape[5]
    if tile is None:
        tile = min(triton.next_power_of_2(slab), max(MAX_TILE_BYTES // src.element_size(), 16))
    grid = (num_pairs, src.shape[0] * 2)
    args = (src, dst, ids.contiguous(), num_pairs,
            src.stride(0), src.stride(1), src.stride(2),
            dst.stride(0), dst.stride(1), dst.stride(2))
    meta = dict(SLAB=slab, TILE=tile, EVEN=slab % tile == 0,
                num_warps=8 if tile * src.element_size() >= 16 << 10 else 4)
    if warmup:
        _kernel().warmup(*args, grid=grid, **meta)
    else:
        _kernel()[grid](*args, **meta)


def _copy_triton(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, tile: int | None = None) -> None:
    _launch(src, dst, ids, tile)


def prepare(src: torch.Tensor, dst: torch.Tensor) -> str:
    """Compile the kernel for this pair of caches now (seconds, once per layout and process), so
    that the first `copy_blocks` only launches; returns the backend "auto" picks. Nothing is
    read or written."""
    check_caches(src, dst)
    backend = choose_backend(src, dst)
    if backend == TRITON:
        _launch(src, dst, torch.zeros((2, 1), dtype=torch.int32, device=dst.device), warmup=True)
    return backend


def _copy_torch(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, max_chunk_blocks: int | None) -> None:
    """The gather-then-scatter reference; `ids` is [2, n] int64 on dst's device."""
    n = ids.shape[1]
    per = n if not max_chunk_blocks or max_chunk_blocks < 1 else max_chunk_blocks
    for i in range(0, n, per):
        dst.index_copy_(2, ids[1, i:i + per], src.index_select(2, ids[0, i:i + per]))
