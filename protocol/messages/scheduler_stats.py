"""The scheduler's periodic report to the gateway (`SchedulerStats`): readiness, /workers, metrics."""

from __future__ import annotations

from protocol.messages.base import WorkerRole, _Msg, _Part


class WorkerInfo(_Part):
    worker_id: str
    role: WorkerRole
    pid: int
    host: str
    device: str
    state: str  # "ready" | "draining" | "dead"
    num_blocks_total: int
    num_blocks_used: int
    num_running: int
    num_waiting: int
    num_steps: int = 0  # steps completed since the worker joined
    busy_seconds: float = 0.0  # their summed execute time (utilization = its rate of growth)
    gpu_seconds: float = 0.0  # summed device time of the steps (CUDA)
    gpu_gap_seconds: float = 0.0  # summed device idle time between back-to-back steps (CUDA)
    transfers_in: int = 0  # KV transfers into this worker in flight
    transfers_out: int = 0  # KV transfers out of it in flight
    transfers_done: int = 0  # completed transfers into it since it joined
    transfer_bytes: int = 0  # their bytes
    transports: list[str] = []
    transfers_by_transport: dict[str, int] = {}  # completed transfers into it, by the path used


class TransferRecord(_Part):
    """One finished KV transfer, reported once in the next SchedulerStats (for histograms)."""

    transport: str
    num_bytes: int
    seconds: float
    ok: bool


class RequestPhases(_Part):
    """Where one finished request spent its time, reported once (for histograms).

    queue: arrival to first scheduled; prefill: first scheduled to first token; transfer: KV
    transfers (0 without disaggregation); decode: first token to finish, transfers excluded.
    """

    queue_seconds: float
    prefill_seconds: float
    transfer_seconds: float
    decode_seconds: float
    disaggregated: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class SchedulerStats(_Msg, tag="stats"):
    """The scheduler's state, published periodically: readiness, /workers and metrics."""

    timestamp: float
    model: str
    max_model_len: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # blocks held by live requests / total, over all workers
    prefix_cache_queries: int  # cumulative prompt tokens looked up
    prefix_cache_hits: int  # cumulative prompt tokens found
    workers: list[WorkerInfo] = []
    transfers: list[TransferRecord] = []  # finished since the previous stats
    phases: list[RequestPhases] = []  # requests finished since the previous stats
    num_migrations: int = 0  # cumulative: requests moved off a dead or draining worker
    num_preemptions: int = 0  # cumulative
    integrity_checks: int = 0  # cumulative full checks of every worker's KV accounting
    integrity_failures: int = 0  # of those, failed (a bug: the log says what contradicted)
    step_tokens: list[int] = []  # tokens scheduled in each step planned since the previous stats
    # The KV cache config as vLLM's cache_config_info labels (block_size, num_gpu_blocks, ...).
    cache_info: dict[str, str] = {}
    max_waiting: int = 0  # the stack-wide waiting bound now (admission at the gateway)
    batch_capacity: int = 0  # sequences the ready workers can run at once
