"""Triton kernels for the CUDA path: paged attention, the KV-cache write and small fusions.

Each module holds one idea and its wrapper; `reference` holds the plain-torch definition of
every kernel, which the tests (CPU, through `TRITON_INTERPRET=1`) and the device check script
(`tests/benchmarks/gpu_kernels.py`) compare against. The wrappers take the project's layouts
as they are: a layer's K and V caches are [num_blocks, block_size, kv_heads, head_dim] views
of the one cache tensor (gpu_worker.kv_cache), block tables are padded with block 0 (the null
block), cache slots are block * block_size + offset, cos/sin tables are HF rotate-half.

Importing this package imports triton and torch only (no protocol, no sockets), so the
device-side scripts can use it on a machine without the service's dependencies.
"""

from gpu_worker.triton_kernels.activation import silu_and_mul
from gpu_worker.triton_kernels.decode_attention import DecodeLaunch, choose_num_splits, paged_decode_attention
from gpu_worker.triton_kernels.kv_write import write_kv_cache
from gpu_worker.triton_kernels.prefill_attention import (
    paged_prefill_attention, prefill_work_list, query_tile_tokens,
)
from gpu_worker.triton_kernels.norm import fused_add_rms_norm, rms_norm
from gpu_worker.triton_kernels.rotary import rotary_embedding_
from gpu_worker.triton_kernels.rotary_kv_write import rotary_and_write_kv

__all__ = [
    "DecodeLaunch",
    "choose_num_splits",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_work_list",
    "query_tile_tokens",
    "rms_norm",
    "rotary_and_write_kv",
    "rotary_embedding_",
    "silu_and_mul",
    "write_kv_cache",
]
