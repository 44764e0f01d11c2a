"""Who is in the stack and alive: a worker's registration (`WorkerHello` and the scheduler's
answers), heartbeats of workers and of tokenizer/detokenizer stages, draining and shutdown."""

from __future__ import annotations

from protocol.messages.base import WorkerRole, _Msg, _Part


class KVLayout(_Part):
    """What must agree between workers that exchange KV blocks, checked at registration."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"
    block_size: int


class WorkerHello(_Msg, tag="hello"):
    """First message of a worker: the fixed facts the scheduler plans with."""

    worker_id: str
    role: WorkerRole
    pid: int
    host: str
    device: str
    model: str
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    kv_layout: KVLayout | None = None
    kv_address: str = ""  # where this worker serves its KV blocks to peers (KVFetch)
    transports: list[str] = []  # KV transports it can pull with: "zmq", "cuda-ipc"
    node_id: str = ""  # host identity for same-host transports (boot id + hostname)


class WorkerAccepted(_Msg, tag="accepted"):
    """The scheduler's answer to WorkerHello: the worker is registered and will get steps."""

    worker_id: str
    scheduler_pid: int


class WorkerRefused(_Msg, tag="refused"):
    """The worker does not fit the stack (another model, KV layout or context): it must exit."""

    worker_id: str
    reason: str


class WorkerUnknown(_Msg, tag="unknown"):
    """The scheduler has no record of this worker (it restarted, or declared it dead): register
    again with a fresh WorkerHello, after dropping every sequence."""

    worker_id: str


class Heartbeat(_Msg, tag="heartbeat"):
    worker_id: str
    timestamp: float


class WorkerDraining(_Msg, tag="draining"):
    """The worker got SIGTERM: no new requests; it exits when the scheduler sends Shutdown."""

    worker_id: str


class Shutdown(_Msg, tag="shutdown"):
    reason: str = ""


class StageHeartbeat(_Msg, tag="stage"):
    """A tokenizer or detokenizer is alive (to the gateway; detokenizers also to the scheduler).
    A new pid under a known stage id means the stage restarted: what it held is lost."""

    stage: str  # "tokenizer" | "detokenizer"
    stage_id: str
    pid: int
    host: str
    timestamp: float
