"""The Triton backend (CUDA): paged decode and prefill attention read straight from the cache, the
fused KV write, fused add + RMSNorm, in-place rotary and SiLU-and-mul (gpu_worker.triton_kernels).

Per step, `prepare` packs every index array into one int32 host buffer (pinned on CUDA, each
array 16-byte aligned) and moves it with ONE host-to-device copy; the metadata is views of that
device buffer. A step
whose sequences all run one token uses the split decode kernel, any other step (prefill chunks,
cached prefixes, decodes mixed in) the prefill kernel, which covers a query length of one too,
over a work list of the query tiles that exist (staged with the rest), not a dense grid.
The same metadata type over fixed buffers is what the CUDA-graph executor captures
(gpu_worker.backends.cuda_graphs): the kernels read context lengths on the device, so a
captured launch replays for any lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker import triton_kernels as tk
from gpu_worker.backends.base import AttentionBackend
from gpu_worker.backends.staging import HostStaging
from gpu_worker.rope import RotaryEmbedding
from gpu_worker.step_inputs import StepInputs


@dataclass
class TritonMetadata:
    positions: torch.Tensor  # int32 [T]
    slot_mapping: torch.Tensor  # int32 [T], negative = write nothing (graph padding)
    context_lens: torch.Tensor  # int32 [S]
    query_start: torch.Tensor  # int32 [S + 1]
    block_tables: torch.Tensor  # int32 [S, W]
    max_query_len: int
    decode: bool  # every sequence one token: the split decode kernel
    decode_launch: tk.DecodeLaunch  # splits and tiles of the decode kernel (fixed per launch shape)
    work: torch.Tensor | None = None  # int32 [W, 2] (sequence, query tile) for the prefill kernel


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, num_kv_heads: int, sliding_window: int | None,
                 num_q_heads: int | None = None) -> None:
        self.device = device
        self.num_kv_heads = num_kv_heads
        self.tile_tokens = tk.query_tile_tokens(num_q_heads or num_kv_heads, num_kv_heads)
        self.sliding_window = sliding_window
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.staging = HostStaging(device)
        # CUDA-graph batch size -> the decode launch start-up timings chose (attention_tuning)
        self.tuned_decode: dict[int, tk.DecodeLaunch] = {}

    def decode_splits(self, num_seqs: int, max_context: int) -> int:
        return tk.choose_num_splits(num_seqs, self.num_kv_heads, max_context, self.num_sms)

    def graph_decode_launch(self, bucket: int, max_context: int) -> tk.DecodeLaunch:
        """The decode launch a CUDA graph of `bucket` sequences captures: the tuned one if start-up
        timings chose one, else the default tiles with splits for the largest context."""
        return self.tuned_decode.get(bucket) or tk.DecodeLaunch(self.decode_splits(bucket, max_context))

    def prepare(self, step: StepInputs) -> TritonMetadata:
        width = step.block_tables.shape[1]
        decode = step.is_decode_only
        work = None if decode else tk.prefill_work_list(step.query_lens, self.tile_tokens)
        parts = [step.positions, step.slot_mapping, step.context_lens, step.query_start, step.block_tables]
        staged = self.staging.to_device(parts + ([work] if work is not None else []))
        positions, slots, ctx, qstart, tables = staged[:5]
        return TritonMetadata(
            positions=positions, slot_mapping=slots, context_lens=ctx, query_start=qstart,
            block_tables=tables.view(step.num_seqs, width), max_query_len=step.max_query_len, decode=decode,
            decode_launch=tk.DecodeLaunch(self.decode_splits(step.num_seqs, step.max_context_len) if decode else 1),
            work=None if work is None else staged[5].view(-1, 2),
        )

    def positions(self, meta: TritonMetadata) -> torch.Tensor:
        return meta.positions

    def write_kv(self, k_cache, v_cache, k, v, meta: TritonMetadata) -> None:
        tk.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: TritonMetadata, scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.decode:
            return tk.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                sliding_window=self.sliding_window, num_splits=meta.decode_launch.num_splits, out=out,
                block_n=meta.decode_launch.block_n, num_warps=meta.decode_launch.num_warps,
                num_stages=meta.decode_launch.num_stages,
            )
        return tk.paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.context_lens, scale,
            meta.max_query_len, sliding_window=self.sliding_window, out=out, work=meta.work,
        )

    def rotary_inputs(self, rope: RotaryEmbedding, meta: TritonMetadata):
        return meta.positions, rope.cos, rope.sin

    def rotary(self, q, k, rot):
        positions, cos, sin = rot
        tk.rotary_embedding_(q, k, positions, cos, sin)
        return q, k

    def rotary_write_kv(self, q, k, v, rot, k_cache, v_cache, meta: TritonMetadata):
        positions, cos, sin = rot
        tk.rotary_and_write_kv(q, k, v, k_cache, v_cache, positions, meta.slot_mapping, cos, sin)
        return q

    def rms_norm(self, x, weight, eps):
        return tk.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return tk.fused_add_rms_norm(x, residual, weight, eps, residual_out=residual)

    def silu_and_mul(self, gate_up):
        return tk.silu_and_mul(gate_up)
