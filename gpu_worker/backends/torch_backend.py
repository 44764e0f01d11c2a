"""The torch backends: gathered blocks + one batched SDPA per length bucket ("torch"), with
decode tokens optionally handed to the CPU C kernel ("cpu-c"). gpu_worker.attention holds the
arithmetic; this adapts it to the backend contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker.attention import AttentionMetadata, metadata_from_layout, paged_attention, write_kv
from gpu_worker.backends.base import AttentionBackend
from gpu_worker.cpu_kernels.paged_decode import PagedDecodeKernel
from gpu_worker.step_inputs import StepInputs, TokenLayout


@dataclass
class TorchMetadata:
    attention: AttentionMetadata
    positions: torch.Tensor  # int64 [T] on the device


class TorchBackend(AttentionBackend):
    def __init__(self, device: torch.device, heads_per_kv: int, sliding_window: int | None,
                 decode_kernel: PagedDecodeKernel | None = None) -> None:
        self.device = device
        self.heads_per_kv = heads_per_kv
        self.sliding_window = sliding_window
        self.decode_kernel = decode_kernel
        self.name = "cpu-c" if decode_kernel is not None else "torch"

    def prepare(self, step: StepInputs) -> TorchMetadata:
        layout = TokenLayout(step.query_start[:-1], step.positions, step.slot_mapping)
        attention = metadata_from_layout(
            layout, step.num_computed, step.query_lens, step.block_tables, step.block_size,
            self.heads_per_kv, self.sliding_window, self.device, self.decode_kernel,
        )
        return TorchMetadata(attention, torch.from_numpy(step.positions).to(self.device, non_blocking=True))

    def positions(self, meta: TorchMetadata) -> torch.Tensor:
        return meta.positions

    def write_kv(self, k_cache, v_cache, k, v, meta: TorchMetadata) -> None:
        write_kv(k_cache, v_cache, k, v, meta.attention.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: TorchMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, meta.attention, scale)
