"""Every setting, defined once: its type, default, help, CLI flag and PDSERVE_* variable.

A settings group is a frozen msgspec struct; `SETTING_HELP` documents each field. The flag of
field `max_num_seqs` is `--max-num-seqs` and its variable `PDSERVE_MAX_NUM_SEQS`. Precedence:
flag > environment > default. Groups cross sockets unchanged (the scheduler sends the worker its
settings in a later issue), so they are plain data with no behaviour beyond checking ranges.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any, Mapping, TypeVar, get_args, get_origin

import msgspec

ENV_PREFIX = "PDSERVE_"


class ConfigError(ValueError):
    """A setting is out of range or inconsistent with another."""


class ModelSettings(msgspec.Struct, frozen=True, kw_only=True):
    model: str = "smollm2-135m"
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    cache_dir: str = str(Path("~/.cache/pdserve"))
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    overlap_steps: str = "auto"
    chat_template: str | None = None
    kernel_tuning: str = "auto"

    def validate(self) -> None:
        _choice("overlap_steps", self.overlap_steps, ("auto", "on", "off"))
        _choice("kernel_tuning", self.kernel_tuning, ("auto", "off"))
        _choice("load_format", self.load_format, ("auto", "safetensors", "gguf", "dummy"))
        _choice("attention_backend", self.attention_backend, ("auto", "torch", "cpu-c", "triton"))
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


class CacheSettings(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int = 16
    memory_utilization: float | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.memory_utilization is not None and not 0.0 < self.memory_utilization <= 1.0:
            raise ConfigError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    scheduling_policy: str = "fcfs"
    max_waiting_requests: int | None = None
    max_queue_time: float | None = None
    max_inflight_steps: int = 2
    max_local_prefill_tokens: int = 64
    kv_transfer_timeout: float = 30.0
    drain_timeout: float = 60.0
    check_integrity_interval: float = 0.0
    log_stats_interval: float = 10.0

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        _choice("scheduling_policy", self.scheduling_policy, ("fcfs", "priority"))
        if not 1 <= self.max_inflight_steps <= 8:
            raise ConfigError(f"max_inflight_steps must be in [1, 8], got {self.max_inflight_steps}")
        if self.max_local_prefill_tokens < 0:
            raise ConfigError(f"max_local_prefill_tokens must be >= 0, got {self.max_local_prefill_tokens}")
        for name in ("kv_transfer_timeout", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ConfigError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")
        if self.max_queue_time is not None and self.max_queue_time <= 0:
            raise ConfigError(f"max_queue_time must be > 0, got {self.max_queue_time}")
        for name in ("check_integrity_interval", "log_stats_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class EndpointSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the pipeline's sockets live; `protocol.endpoints.Endpoints.from_settings` reads it."""

    run_dir: str | None = None
    tcp_host: str | None = None
    tcp_base_port: int | None = None
    scheduler_host: str | None = None
    gateway_host: str | None = None

    @property
    def is_tcp(self) -> bool:
        return self.tcp_base_port is not None

    def validate(self) -> None:
        check_tcp_settings(self.tcp_host, self.tcp_base_port, self.scheduler_host, self.gateway_host)
        if self.tcp_base_port is not None and not 1 <= self.tcp_base_port <= 65535:
            raise ConfigError(f"tcp_base_port must be in [1, 65535], got {self.tcp_base_port}")


def check_tcp_settings(
    tcp_host: str | None, tcp_base_port: int | None, scheduler_host: str | None = None,
    gateway_host: str | None = None,
) -> None:
    """Raise ConfigError unless the tcp settings are all absent or name a port and both hosts."""
    per_socket = scheduler_host is not None or gateway_host is not None
    if not per_socket and (tcp_host is None) != (tcp_base_port is None):
        raise ConfigError("tcp_host and tcp_base_port must be given together")
    if per_socket and tcp_base_port is None:
        raise ConfigError("scheduler_host and gateway_host need tcp_base_port")
    if per_socket and tcp_host is None and (scheduler_host is None or gateway_host is None):
        missing = "gateway_host" if gateway_host is None else "scheduler_host"
        raise ConfigError(f"tcp needs {missing} or tcp_host as well")


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_request_bytes: int = 1 << 20
    request_timeout: float = 600.0
    metrics_prefix: str = "pdserve"
    tool_call_parser: str = "hermes"

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.metrics_prefix):
            raise ConfigError(f"metrics_prefix must be a Prometheus name part ([A-Za-z_][A-Za-z0-9_]*), "
                              f"got {self.metrics_prefix!r}")
        _choice("tool_call_parser", self.tool_call_parser, ("hermes", "llama3_json"))
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")


class StageSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Identity and liveness of one pipeline process; the launcher sets stage_id per child."""

    stage_id: str | None = None
    role: str = "mixed"
    heartbeat_interval: float = 1.0
    liveness_timeout: float = 10.0
    torch_threads: int | None = None
    kv_host: str | None = None

    def validate(self) -> None:
        _choice("role", self.role, ("mixed", "prefill", "decode"))
        if self.heartbeat_interval <= 0 or self.liveness_timeout <= self.heartbeat_interval:
            raise ConfigError("liveness_timeout must exceed heartbeat_interval, both > 0")


class LaunchSettings(msgspec.Struct, frozen=True, kw_only=True):
    tokenizers: int = 1
    detokenizers: int = 1
    workers: int | None = None
    prefill_workers: int = 0
    decode_workers: int = 0
    restart_workers: bool = False
    ready_timeout: float = 300.0

    @property
    def num_mixed_workers(self) -> int:
        """--workers, or 1 when no worker of any role was asked for."""
        if self.workers is not None:
            return self.workers
        return 0 if self.prefill_workers or self.decode_workers else 1

    def validate(self) -> None:
        for name in ("tokenizers", "detokenizers"):
            if not 1 <= getattr(self, name) <= 64:
                raise ConfigError(f"{name} must be in [1, 64], got {getattr(self, name)}")
        for name in ("workers", "prefill_workers", "decode_workers"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 64:
                raise ConfigError(f"{name} must be in [0, 64], got {value}")
        if self.num_mixed_workers + self.prefill_workers + self.decode_workers < 1:
            raise ConfigError("at least one model worker is needed (--workers, --prefill-workers, --decode-workers)")


SETTING_HELP: dict[str, str] = {
    "model": "model: 'smollm2-135m' (bundled), a Hugging Face directory, or a .gguf file",
    "load_format": "auto | safetensors | gguf | dummy (random weights of the model's shapes)",
    "dtype": "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda | cuda:N",
    "cache_dir": "where converted models are cached",
    "max_model_len": "context length (default: the model's own)",
    "seed": "base seed for dummy weights and for requests without a seed",
    "attention_backend": "auto (on CUDA: triton if it imports, else torch; on CPU: the C decode "
    "kernel if a C compiler is found, else torch) | torch (gather + SDPA everywhere) | cpu-c (the C "
    "decode kernel; fail if it cannot be built) | triton (Triton kernels on CUDA; fail without triton)",
    "enforce_eager": "never capture CUDA graphs: every step runs eagerly (the triton backend "
    "otherwise replays decode steps from graphs captured at start-up)",
    "overlap_steps": "auto (on for CUDA) | on | off: launch step N+1 on the device before step N's "
    "sampled tokens are back on the host (N's samples feed N+1 on the device), hiding the host's "
    "per-step work behind the GPU's",
    "chat_template": "a Jinja chat template file that replaces the model's own (the tokenizer "
    "workers render every chat request with it, tools included)",
    "kernel_tuning": "auto (CUDA, Triton backend: at start-up, time each weight shape's products of up "
    "to 64 rows and run cuBLASLt or the Triton split-K kernel where one beats cuBLAS, and each CUDA "
    "graph's decode-attention splits and tiles) | off (cuBLAS and the default launches)",
    "block_size": "tokens per KV-cache block",
    "memory_utilization": "fraction of device memory (CUDA: total; CPU: available RAM) for "
    "weights + KV cache (default 0.9 on CUDA, 0.1 on CPU)",
    "num_kv_blocks": "use exactly this many KV blocks (overrides memory_utilization)",
    "enable_prefix_caching": "reuse the KV blocks of a shared prompt prefix",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget of one step (prefill chunks + decodes)",
    "scheduling_policy": "fcfs | priority (lower priority value runs first)",
    "max_waiting_requests": "stack-wide bound of requests waiting for a batch slot; past it the "
    "gateway answers 429 with Retry-After at once (default: one full batch per ready worker, "
    "min(max_num_seqs, its KV blocks), summed)",
    "max_queue_time": "seconds a request may wait for its first step; past it it fails with a 503 "
    "'queue_timeout' error (default: no limit)",
    "max_inflight_steps": "steps the scheduler keeps queued at a worker: 2 plans step N+1 while N "
    "runs, hiding the round trip; 1 waits for each result",
    "max_local_prefill_tokens": "with prefill and decode workers: a prompt with fewer uncached "
    "tokens than this is prefilled where it decodes, without a KV transfer",
    "kv_transfer_timeout": "seconds a KV transfer between workers may take before both sides' "
    "blocks are released and the request is recomputed elsewhere",
    "drain_timeout": "seconds a draining worker (SIGTERM) may finish its requests before the rest "
    "move to other workers",
    "check_integrity_interval": "seconds between full checks of every worker's KV accounting "
    "(0: only after failures); for tests and debugging",
    "log_stats_interval": "seconds between the scheduler's throughput lines in the log (steps/s, "
    "tokens computed and generated per second, workers busy, running, waiting, KV cache use), "
    "logged while there is work; 0: none",
    "host": "address the HTTP gateway listens on",
    "port": "HTTP port of the gateway",
    "api_key": "require 'Authorization: Bearer <key>' on /v1 routes",
    "served_model_name": "model name in the API (default: the --model value)",
    "max_request_bytes": "largest accepted request body (413 past it)",
    "request_timeout": "seconds a request may take before the gateway aborts it",
    "metrics_prefix": "prefix of the /metrics names: pdserve (pdserve:num_requests_running...) or "
    "vllm for vLLM's exact names, which vLLM dashboards chart unchanged",
    "tool_call_parser": "how tool calls are read from the output under tool_choice auto: hermes "
    "(<tool_call>{json}</tool_call>, the bundled template's format) | llama3_json ({\"name\": ..., "
    "\"parameters\": ...} objects separated by ;)",
    "stage_id": "this process's id (worker id, tokenizer id...); default: stage name, hostname "
    "and pid (unique across containers, where every pid is 1)",
    "role": "worker role: mixed | prefill | decode",
    "heartbeat_interval": "seconds between liveness messages",
    "liveness_timeout": "seconds of silence after which a process counts as dead",
    "torch_threads": "CPU threads for torch in a worker (default: torch's own choice)",
    "kv_host": "host or address other workers reach this worker's KV blocks at over tcp "
    "(default: the stack's --tcp-host); ipc stacks use the run directory",
    "tokenizers": "tokenizer worker processes started by `pdserve up`",
    "detokenizers": "detokenizer worker processes started by `pdserve up`",
    "workers": "mixed (prefill + decode) model workers started by `pdserve up` (default 1, or "
    "0 when --prefill-workers/--decode-workers are given)",
    "prefill_workers": "prefill-only model workers started by `pdserve up` (disaggregation)",
    "decode_workers": "decode-only model workers started by `pdserve up` (disaggregation)",
    "restart_workers": "`pdserve up` restarts a model worker that dies (others keep serving meanwhile)",
    "ready_timeout": "seconds `pdserve up` waits for every stage to be ready",
    "run_dir": "directory of the ipc:// sockets (default: a fresh temporary directory)",
    "tcp_host": "use tcp:// sockets on this host instead of ipc:// (needs tcp_base_port)",
    "tcp_base_port": "first of the consecutive tcp ports, one per socket (needs tcp_host, or "
    "scheduler_host and gateway_host)",
    "scheduler_host": "host of the scheduler's tcp sockets (scheduler_in, worker_router, "
    "detokenizer_in), e.g. a compose service name (default: tcp_host)",
    "gateway_host": "host of the gateway's tcp sockets (tokenizer_in, gateway_in), e.g. a compose "
    "service name (default: tcp_host)",
}

S = TypeVar("S", bound=msgspec.Struct)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def add_settings_arguments(parser: argparse.ArgumentParser, group: type[msgspec.Struct]) -> None:
    """Add one flag per field of `group`; unset flags stay None so env/defaults can apply."""
    for f in msgspec.structs.fields(group):
        help_text = SETTING_HELP.get(f.name, "")
        help_text += f" [env {env_name(f.name)}; default {f.default!r}]"
        if _base_type(f.type) is bool:
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=None,
                action=argparse.BooleanOptionalAction, help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                help=help_text,
            )


def settings_from(
    group: type[S], args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
) -> S:
    """Build `group` from flags (if given), then PDSERVE_* variables, then defaults; validate."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in msgspec.structs.fields(group):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None and env_name(f.name) in env:
            raw = env[env_name(f.name)]
        if raw is None:
            continue
        values[f.name] = _convert(f.name, raw, f.type)
    try:
        settings = group(**values)
    except (TypeError, msgspec.ValidationError) as exc:
        raise ConfigError(str(exc)) from exc
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def _base_type(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) is not None and len(args) == 1 else tp


def _convert(name: str, raw: Any, tp: Any) -> Any:
    if isinstance(raw, str):
        base = _base_type(tp)
        if raw.lower() in ("", "none") and base is not tp:
            return None
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected a boolean, got {raw!r}")
    try:
        return msgspec.convert(raw, tp, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{name}: {exc} (got {raw!r})") from exc


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
