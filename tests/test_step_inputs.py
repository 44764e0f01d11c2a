"""Generic step inputs (what every backend reads) and the host side of CUDA-graph decode steps."""

from __future__ import annotations

import numpy as np
import torch

from gpu_worker.backends.graph_layout import GraphLayout, choose_bucket, graph_batch_sizes
from gpu_worker.backends.staging import HostStaging, aligned_offsets
from gpu_worker.seq_state import ScheduledSeq, SeqState
from gpu_worker.step_inputs import build_step_inputs
from protocol.sampling import SamplingParams

BS = 4


def scheduled(rid: str, tokens: int, blocks: list[int], computed: int, now: int) -> ScheduledSeq:
    state = SeqState(rid, list(range(100, 100 + tokens)), tokens, blocks, computed, SamplingParams(), [2], 0)
    return ScheduledSeq(state, computed, now)


def test_mixed_step_packs_positions_slots_and_sampled_rows():
    seqs = [
        scheduled("decode", 6, [7, 3], 5, 1),  # one decode token at position 5: block 3, offset 1
        scheduled("chunk", 9, [2, 8, 5], 2, 4),  # a middle prefill chunk: positions 2..5, no sample
        scheduled("prompt", 3, [6], 0, 3),  # a whole prompt: samples after its last token
    ]
    step = build_step_inputs(seqs, BS)
    assert step.input_ids.tolist() == [105, 102, 103, 104, 105, 100, 101, 102]
    assert step.positions.tolist() == [5, 2, 3, 4, 5, 0, 1, 2]
    assert step.slot_mapping.tolist() == [3 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 8 * 4 + 0, 8 * 4 + 1, 24, 25, 26]
    assert step.query_start.tolist() == [0, 1, 5, 8]
    assert step.context_lens.tolist() == [6, 6, 3]
    assert step.block_tables.tolist() == [[7, 3, 0], [2, 8, 5], [6, 0, 0]]
    assert step.sample_seqs.tolist() == [0, 2]
    assert step.sample_rows.tolist() == [0, 7]
    assert (step.max_query_len, step.max_context_len, step.is_decode_only) == (4, 6, False)


def test_decode_only_step():
    step = build_step_inputs([scheduled("a", 6, [7, 3], 5, 1), scheduled("b", 2, [4], 1, 1)], BS)
    assert step.is_decode_only
    assert step.sample_rows.tolist() == [0, 1]
    assert step.positions.tolist() == [5, 1]


def test_graph_batch_sizes_and_bucket_choice():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    sizes = graph_batch_sizes(100)
    assert [choose_bucket(sizes, n) for n in (1, 3, 16, 17, 65, 100, 101)] == [1, 4, 16, 32, 100, 100, None]


def test_graph_layout_pads_rows_so_they_write_and_read_nothing():
    layout = GraphLayout(max_batch=8, max_blocks=5)
    step = build_step_inputs([scheduled("a", 6, [7, 3], 5, 1), scheduled("b", 2, [4], 1, 1),
                              scheduled("c", 9, [1, 2, 9], 8, 1)], BS)
    assert layout.fits(step)
    bucket = choose_bucket([1, 2, 4, 8], step.num_seqs)
    head, tables, rows = layout.host_parts(step, bucket)
    buffer = torch.full((layout.size,), 99, dtype=torch.int32)
    buffer[: layout.head] = torch.from_numpy(head)
    ids, positions, slots, ctx, qstart, table_view = layout.views(buffer, bucket)
    assert ids.tolist() == [105, 101, 108, 0]
    assert positions.tolist() == [5, 1, 8, 0]
    assert slots.tolist() == [13, 17, 36, -1]  # the padding row writes no KV
    assert ctx.tolist() == [6, 2, 9, 0]  # and attends to nothing
    assert qstart.tolist() == [0, 1, 2, 3, 3]
    assert table_view.shape == (4, 5)
    assert tables.tolist() == [[7, 3, 0], [4, 0, 0], [1, 2, 9]] and rows.tolist() == [0, 1, 2]
    # every slot past the bucket is padding too, whatever bucket replays next
    assert (head[layout.offset("slot_mapping") : layout.offset("slot_mapping") + 8][3:] == -1).all()


def test_graph_layout_refuses_what_a_graph_cannot_replay():
    layout = GraphLayout(max_batch=2, max_blocks=2)
    prefill = build_step_inputs([scheduled("a", 6, [7, 3], 3, 3)], BS)
    wide = build_step_inputs([scheduled("a", 10, [7, 3, 5], 9, 1)], BS)
    many = build_step_inputs([scheduled(str(i), 2, [i + 1], 1, 1) for i in range(3)], BS)
    assert not layout.fits(prefill) and not layout.fits(wide) and not layout.fits(many)


def test_host_staging_packs_every_array_into_one_buffer():
    step = build_step_inputs([scheduled("a", 6, [7, 3], 4, 2), scheduled("b", 2, [4], 1, 1)], BS)
    positions, slots, ctx, qstart, tables = HostStaging(torch.device("cpu")).to_device(
        [step.positions, step.slot_mapping, step.context_lens, step.query_start, step.block_tables])
    assert positions.dtype == torch.int32
    assert positions.tolist() == [4, 5, 1] and slots.tolist() == [12, 13, 17]
    assert ctx.tolist() == [6, 2] and qstart.tolist() == [0, 2, 3]
    assert np.array_equal(tables.view(2, 2).numpy(), step.block_tables)
    # Every view starts on a 16-byte boundary of one buffer (Triton specializes on alignment).
    base = positions.data_ptr()
    assert all((t.data_ptr() - base) % 16 == 0 for t in (slots, ctx, qstart, tables))
    assert aligned_offsets([3, 3, 2, 3, 4]) == [0, 4, 8, 12, 16, 20]
