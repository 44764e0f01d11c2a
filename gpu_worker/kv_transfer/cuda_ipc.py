"""Open another process's CUDA KV cache in this one, so blocks copy device to device.

torch shares a CUDA storage as a tuple (`UntypedStorage._share_cuda_()`): device, IPC memory
handle, storage size and offset in its allocation, a ref-counter file and offset, an IPC event
and whether to wait on it. That tuple is plain ints and bytes, so it travels in a KVIpcHandle
without pickle and is rebuilt here with `UntypedStorage._new_shared_cuda` (the pair torch's own
multiprocessing reductions use; same signature in torch 2.11 and 2.13). This module needs torch
only, so it can be exercised without the messaging stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CudaIpcError(RuntimeError):
    """The cache cannot be shared, or a shared cache cannot be opened here."""


@dataclass(frozen=True)
class SharedCache:
    """What another process needs to open a cache tensor: the share tuple's parts, split by type
    the way KVIpcHandle carries them, plus the tensor's shape and dtype."""

    handle: bytes
    fields: list[int]  # device, size_bytes, offset_bytes, ref_counter_offset, event_sync_required
    ref_counter_handle: bytes
    event_handle: bytes
    shape: list[int]
    dtype: torch.dtype


def share(kv_cache: torch.Tensor) -> SharedCache:
    """The share parts of a contiguous CUDA cache that starts at its storage's first byte."""
    if kv_cache.device.type != "cuda":
        raise CudaIpcError(f"the KV cache is on {kv_cache.device}, not on a CUDA device")
    if not kv_cache.is_contiguous() or kv_cache.storage_offset() != 0:
        raise CudaIpcError("the KV cache must be contiguous and start at its storage's offset 0")
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = kv_cache.untyped_storage()._share_cuda_()
    return SharedCache(
        handle=bytes(handle),
        fields=[int(device), int(size_bytes), int(offset_bytes), int(ref_offset), int(bool(event_sync))],
        ref_counter_handle=bytes(ref_handle),
        event_handle=bytes(event_handle or b""),
        shape=list(kv_cache.shape),
        dtype=kv_cache.dtype,
    )


def open_shared(shared: SharedCache, device: torch.device) -> torch.Tensor:
    """The other process's cache as a tensor here, mapped (not copied) through CUDA IPC.

    It opens on `device`, this process's own cache device, not on the source's device index:
    device numbering differs between processes (CUDA_VISIBLE_DEVICES), and the copy runs here.
    Raises CudaIpcError with the driver's reason when the handle cannot be opened.
    """
    if len(shared.fields) != 5:
        raise CudaIpcError(f"a CUDA share needs 5 integer fields, got {len(shared.fields)}")
    _, size_bytes, offset_bytes, ref_offset, event_sync = shared.fields
    numel = 1
    for d in shared.shape:
        numel *= d
    elem = torch.empty((), dtype=shared.dtype).element_size()
    if numel * elem > size_bytes:
        raise CudaIpcError(
            f"the shared storage holds {size_bytes} bytes, less than a {shared.dtype} tensor of "
            f"shape {shared.shape} needs ({numel * elem})"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            index, shared.handle, size_bytes, offset_bytes, shared.ref_counter_handle,
            ref_offset, shared.event_handle, bool(event_sync),
        )
    except Exception as exc:  # the driver's message is the useful part
        raise CudaIpcError(f"cannot open the CUDA IPC handle: {type(exc).__name__}: {exc}") from exc
    tensor = torch.empty(0, dtype=shared.dtype, device=torch.device("cuda", index))
    return tensor.set_(storage, 0, shared.shape)
