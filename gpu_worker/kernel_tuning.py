"""Start-up kernel choices on CUDA (`--kernel-tuning auto`): which kernel runs each small-batch
matrix product (gpu_worker.matmul_tuning) and how each CUDA-graph decode step cuts its attention
launch (gpu_worker.attention_tuning), both timed on this device before the KV cache is sized."""

from __future__ import annotations

import logging

import torch

from gpu_worker.attention_tuning import tune_decode_attention
from gpu_worker.matmul_tuning import tune_linears

log = logging.getLogger(__name__)


def tune_kernels(model, backend, cfg, graph_sizes: list[int], dtype: torch.dtype, block_size: int,
                 max_model_len: int) -> None:
    """Time and set the choices on `model`'s Linears and on `backend` (a TritonBackend). A
    tuning that fails is logged and leaves the defaults: it may cost speed, never the worker."""
    try:
        tune_linears(model.linear_ops())
    except Exception:
        log.exception("matrix-product tuning failed; cuBLAS everywhere")
    if graph_sizes:
        try:
            tune_decode_attention(backend, graph_sizes, cfg.num_attention_heads, cfg.num_key_value_heads,
                                  cfg.head_dim, dtype, block_size, max_model_len)
        except Exception:  # tuned_decode is set only once the timings are done: still the defaults
            log.exception("decode-attention tuning failed; the default launches")
