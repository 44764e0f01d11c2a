"""KV block transfers between workers: the scheduler orders one (`KVPull`, `KVCancel`) and hears
how it ended (`KVPullDone`); the destination fetches the blocks from the source's KV peer socket
(`KVFetch` -> `KVChunk`) or opens its cache over CUDA IPC (`KVIpcHandleRequest` -> `KVIpcHandle`)."""

from __future__ import annotations

import numpy as np

from protocol.messages.base import _Msg


class KVPull(_Msg, tag="kv_pull"):
    """To a destination worker: copy these blocks of a source worker into these blocks of yours.

    The scheduler holds both sides' blocks for the transfer's whole life, so neither is reused
    while it runs; the destination answers with one KVPullDone, or drops it on KVCancel.
    """

    transfer_id: int
    request_id: str
    src_worker_id: str
    src_address: str  # the source's KV peer socket (WorkerHello.kv_address)
    src_block_ids: list[int]
    dst_block_ids: list[int]  # same length, pairwise
    transport: str  # "zmq" | "cuda-ipc"
    timeout: float  # seconds before the destination gives up and reports failure


class KVCancel(_Msg, tag="kv_cancel"):
    """Stop a transfer and never write its blocks again (the scheduler freed them)."""

    transfer_id: int


class KVPullDone(_Msg, tag="kv_done"):
    """A destination worker finished (ok) or gave up on (not ok) a KVPull."""

    worker_id: str
    transfer_id: int
    ok: bool
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str = ""
    error: str = ""


class KVFetch(_Msg, tag="kv_fetch"):
    """Destination to source: send the KV of these blocks (one chunk of a transfer)."""

    transfer_id: int
    chunk: int
    block_ids: list[int]


class KVChunk(_Msg, tag="kv_chunk"):
    """Source to destination: the blocks of one KVFetch, [layers, 2, n, block_size, kv_heads,
    head_dim] in the cache's dtype (bfloat16 travels as its raw 16-bit pattern); on failure an
    empty array and the reason."""

    transfer_id: int
    chunk: int
    data: np.ndarray
    error: str = ""


class KVIpcHandleRequest(_Msg, tag="kv_ipc_req"):
    """Destination to source: the CUDA IPC handle of your KV cache, to copy on the device."""

    node_id: str


class KVIpcHandle(_Msg, tag="kv_ipc"):
    """Source to destination: what opening the source's cache storage in another process needs."""

    handle: bytes = b""
    fields: list[int] = []  # the integer parts of torch's CUDA storage share tuple, in order
    ref_counter_handle: bytes = b""
    event_handle: bytes = b""
    shape: list[int] = []
    dtype: str = ""
    error: str = ""
