"""The host side of CUDA-graph decode steps (gpu_worker.backends.cuda_graphs): which batch
sizes are captured, which one a step replays, and where each input sits in the captured buffer.
Pure numpy and torch views: no CUDA, no triton."""

from __future__ import annotations

import numpy as np
import torch

from gpu_worker.step_inputs import StepInputs


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself: 1, 2, 4, ..., max."""
    sizes = []
    b = 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


def choose_bucket(sizes: list[int], num_seqs: int) -> int | None:
    """The smallest captured size that holds `num_seqs` rows, None if none does."""
    for b in sorted(sizes):
        if b >= num_seqs:
            return b
    return None


class GraphLayout:
    """Offsets of the fields in the captured int32 buffer: five per-row fields of B_max rows
    (query starts B_max + 1), then the [B_max, max_blocks] block table."""

    FIELDS = ("input_ids", "positions", "slot_mapping", "context_lens", "query_start")

    def __init__(self, max_batch: int, max_blocks: int) -> None:
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.head = 5 * max_batch + 1
        self.size = self.head + max_batch * max_blocks

    def offset(self, field: str) -> int:
        return self.FIELDS.index(field) * self.max_batch

    def fits(self, step: StepInputs) -> bool:
        return (step.is_decode_only and len(step.prompt_rows) == 0 and step.num_seqs <= self.max_batch
                and step.block_tables.shape[1] <= self.max_blocks)

    def host_parts(self, step: StepInputs, bucket: int) -> list[np.ndarray]:
        """[head fields padded to `bucket` rows (and B_max), compact block table, sample rows]:
        what one host-to-device copy carries for a replay of `bucket`."""
        n, b = step.num_seqs, self.max_batch
        head = np.zeros(self.head, dtype=np.int32)
        head[self.offset("input_ids") : self.offset("input_ids") + n] = step.input_ids
        head[self.offset("positions") : self.offset("positions") + n] = step.positions
        slots = head[self.offset("slot_mapping") : self.offset("slot_mapping") + b]
        slots[:] = -1
        slots[:n] = step.slot_mapping
        head[self.offset("context_lens") : self.offset("context_lens") + n] = step.context_lens
        q0 = self.offset("query_start")
        head[q0 : q0 + bucket + 1] = np.minimum(np.arange(bucket + 1), n)
        return [head, step.block_tables, step.sample_seqs]

    def views(self, buffer: torch.Tensor, bucket: int) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, slots, context_lens, query_start, block_tables) for `bucket`."""
        o = self.offset
        return (
            buffer[o("input_ids") : o("input_ids") + bucket],
            buffer[o("positions") : o("positions") + bucket],
            buffer[o("slot_mapping") : o("slot_mapping") + bucket],
            buffer[o("context_lens") : o("context_lens") + bucket],
            buffer[o("query_start") : o("query_start") + bucket + 1],
            buffer[self.head :].view(self.max_batch, self.max_blocks)[:bucket],
        )
