"""`--attention-backend`: which backend a worker runs, from its settings and device.

auto: on CUDA the Triton backend when triton imports, else torch; on CPU the C decode kernel when
it builds, else torch (as before the backends existed). triton on a CPU is refused unless Triton's
interpreter is on (TRITON_INTERPRET=1, which the tests use).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch

from gpu_worker.backends.base import AttentionBackend
from gpu_worker.backends.torch_backend import TorchBackend
from gpu_worker.cpu_kernels.build import KernelBuildError
from gpu_worker.cpu_kernels.paged_decode import SUPPORTED_DTYPES, PagedDecodeKernel
from protocol.config import ConfigError, ModelSettings
from protocol.model_files.model_config import ModelConfig

log = logging.getLogger(__name__)


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def select_backend(settings: ModelSettings, cfg: ModelConfig, device: torch.device,
                   dtype: torch.dtype) -> AttentionBackend:
    name = settings.attention_backend
    if name == "triton" or (name == "auto" and device.type == "cuda" and triton_available()):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"attention_backend triton runs on CUDA, not {device}")
        if not triton_available():
            raise ConfigError("attention_backend triton: triton is not installed")
        from gpu_worker.backends.triton_backend import TritonBackend  # imports triton

        return TritonBackend(device, cfg.num_key_value_heads, cfg.sliding_window, cfg.num_attention_heads)
    kernel = decode_kernel(settings, device, dtype, cfg.sliding_window)
    heads_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    return TorchBackend(device, heads_per_kv, cfg.sliding_window, kernel)


def decode_kernel(
    settings: ModelSettings, device: torch.device, dtype: torch.dtype, sliding_window: int | None
) -> PagedDecodeKernel | None:
    """The C decode-attention kernel where the settings and the device allow it, else None."""
    backend = settings.attention_backend
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return None
    if device.type != "cpu" or dtype not in SUPPORTED_DTYPES:
        if backend == "cpu-c":
            raise ConfigError(f"attention_backend cpu-c runs on CPU in float32/bfloat16, not {device}/{dtype}")
        return None
    try:
        return PagedDecodeKernel(Path(settings.cache_dir).expanduser(), sliding_window)
    except (KernelBuildError, OSError) as exc:
        if backend == "cpu-c":
            raise ConfigError(f"attention_backend cpu-c: {exc}") from exc
        log.warning("C decode-attention kernel unavailable, using torch SDPA: %s", exc)
        return None
