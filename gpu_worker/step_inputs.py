"""One step's inputs as every model backend reads them: plain numpy, built once per step.

The runner packs the scheduled sequences of a step back to back: sequence s owns the packed
rows query_start[s]:query_start[s+1], its tokens at positions num_computed[s] .. context_lens[s]-1
(a prefill chunk, a cached prefix's continuation or one decode token alike). Nothing here is
specific to an attention implementation: the torch backend turns it into gathered-SDPA groups,
the Triton backend into int32 device tensors (or its CUDA-graph buffers), and a TensorRT engine
would bind the same arrays. Block tables are padded with block 0 (the null block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gpu_worker.seq_state import ScheduledSeq


@dataclass
class TokenLayout:
    """Where each packed token sits: its sequence's first row, its position, its cache slot."""

    starts: np.ndarray  # int64 [S]: first packed row of each sequence
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]: block * block_size + offset


def token_layout(
    num_computed: np.ndarray, num_scheduled: np.ndarray, block_tables: np.ndarray, block_size: int
) -> TokenLayout:
    """Positions and cache slots of the packed tokens (index arithmetic only, no Python loop)."""
    num_seqs = len(num_scheduled)
    starts = np.zeros(num_seqs, dtype=np.int64)
    np.cumsum(num_scheduled[:-1], out=starts[1:])
    total = int(num_scheduled.sum())
    token_seq = np.repeat(np.arange(num_seqs), num_scheduled)
    positions = num_computed[token_seq] + (np.arange(total) - starts[token_seq])
    slots = block_tables[token_seq, positions // block_size] * block_size + positions % block_size
    return TokenLayout(starts, positions, slots)


@dataclass
class StepInputs:
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    num_computed: np.ndarray  # int64 [S]: tokens already in the cache before this step
    query_lens: np.ndarray  # int64 [S]: tokens scheduled now
    query_start: np.ndarray  # int64 [S + 1]: cumulative query_lens, starting at 0
    context_lens: np.ndarray  # int64 [S]: num_computed + query_lens (keys after the write)
    block_tables: np.ndarray  # int64 [S, max_blocks], padded with 0
    sample_seqs: np.ndarray  # int64 [N]: sequences that sample a token this step, in order
    block_size: int
    # int64 [R]: packed rows whose logits score a prompt token (gpu_worker.prompt_logprobs);
    # the executor returns their logits after the sampled rows'.
    prompt_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def sample_rows(self) -> np.ndarray:
        """int64 [N]: the packed row (last scheduled token) of each sampling sequence."""
        return self.query_start[self.sample_seqs + 1] - 1

    @property
    def logit_rows(self) -> np.ndarray:
        """int64 [N + R]: the rows the executor computes logits for, sampled rows first."""
        if len(self.prompt_rows) == 0:
            return self.sample_rows
        return np.concatenate([self.sample_rows, self.prompt_rows])

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max()) if self.num_seqs else 0

    @property
    def max_context_len(self) -> int:
        return int(self.context_lens.max()) if self.num_seqs else 0

    @property
    def is_decode_only(self) -> bool:
        """Every sequence runs exactly one token: what a CUDA-graph decode step replays."""
        return self.num_seqs > 0 and self.num_tokens == self.num_seqs


def build_step_inputs(scheduled: Sequence[ScheduledSeq], block_size: int) -> StepInputs:
    """Pack the scheduled sequences in order (the runner calls this once per step)."""
    count = len(scheduled)
    num_computed = np.fromiter((s.num_computed for s in scheduled), np.int64, count)
    query_lens = np.fromiter((s.num_scheduled for s in scheduled), np.int64, count)
    max_blocks = max((len(s.state.block_ids) for s in scheduled), default=0)
    block_tables = np.zeros((count, max_blocks), dtype=np.int64)
    ids: list[int] = []
    for i, s in enumerate(scheduled):
        block_tables[i, : len(s.state.block_ids)] = s.state.block_ids
        ids.extend(s.state.token_ids[s.num_computed : s.num_computed + s.num_scheduled])
    return step_inputs_from_arrays(
        np.asarray(ids, dtype=np.int64), num_computed, query_lens, block_tables, block_size,
        np.fromiter((i for i, s in enumerate(scheduled) if s.samples), np.int64),
    )


def step_inputs_from_arrays(
    input_ids: np.ndarray,
    num_computed: np.ndarray,
    query_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    sample_seqs: np.ndarray,
) -> StepInputs:
    """StepInputs from the per-sequence arrays (benchmarks build synthetic steps this way)."""
    layout = token_layout(num_computed, query_lens, block_tables, block_size)
    query_start = np.zeros(len(query_lens) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start[1:])
    return StepInputs(
        input_ids=input_ids,
        positions=layout.positions,
        slot_mapping=layout.slot_mapping,
        num_computed=num_computed,
        query_lens=query_lens,
        query_start=query_start,
        context_lens=num_computed + query_lens,
        block_tables=block_tables,
        sample_seqs=sample_seqs,
        block_size=block_size,
    )
