"""The start-up choice of each CUDA graph's decode-attention launch (gpu_worker.attention_tuning):
the candidates it times, that every candidate computes the same attention (so whichever wins is
correct), and how the Triton backend hands a graph its launch. The timing itself needs a GPU
(tests/benchmarks/gpu_decode_steps.py logs the choices there)."""

from __future__ import annotations

import pytest
import torch

from tests import triton_interpreter  # first: the kernels must be decorated under the interpreter
from tests.triton_checks import BF16, KV_HEADS, check_close, nan_like, paged_cache
from tests.triton_interpreter import ref, tk

from gpu_worker.attention_tuning import TILES, candidates  # noqa: E402 (after the interpreter)

DecodeLaunch = tk.DecodeLaunch

_interpret = triton_interpreter._interpret  # autouse: the interpreter, with its bf16 corrected


def test_the_default_comes_first_then_other_tiles_and_split_counts() -> None:
    got = candidates(4, 64)
    assert got[0] == DecodeLaunch(4)  # 64 keys, 4 warps, 2 stages: the untuned launch
    assert got[1:4] == [DecodeLaunch(4, 32, 4, 2), DecodeLaunch(4, 32, 4, 3), DecodeLaunch(4, 128, 8, 2)]
    assert {c.num_splits for c in got} == {4, 8, 2}
    assert len(got) == len(set(got)) == 3 * len(TILES)


def test_split_candidates_stay_within_one_and_the_maximum() -> None:
    assert {c.num_splits for c in candidates(1, 64)} == {1, 2}  # no half of one
    assert {c.num_splits for c in candidates(64, 64)} == {64, 32}  # no double past the maximum


@pytest.mark.parametrize("launch", [c for c in candidates(2, 64)], ids=str)
def test_every_candidate_launch_computes_the_same_attention(launch: DecodeLaunch) -> None:
    gen = torch.Generator().manual_seed(5)
    context_lens = [0, 1, 33, 200, 530]
    k, v, tables = paged_cache(gen, [max(n, 1) for n in context_lens], 128, BF16)
    q = torch.randn(len(context_lens), 4 * KV_HEADS, 128, generator=gen).to(BF16)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    out = tk.paged_decode_attention(q, k, v, tables, lens, 128**-0.5, num_splits=launch.num_splits,
                                    block_n=launch.block_n, num_warps=launch.num_warps,
                                    num_stages=launch.num_stages, out=nan_like(q))
    check_close(out, ref.paged_decode_attention(q, k, v, tables, lens, 128**-0.5), BF16)


def test_a_graph_captures_the_tuned_launch_of_its_batch_size_or_the_default() -> None:
    from gpu_worker.backends.triton_backend import TritonBackend

    backend = TritonBackend(torch.device("cpu"), num_kv_heads=8, sliding_window=None, num_q_heads=32)
    default = backend.graph_decode_launch(16, 4096)
    assert default == DecodeLaunch(backend.decode_splits(16, 4096))
    backend.tuned_decode = {16: DecodeLaunch(2, 32, 4, 3)}
    assert backend.graph_decode_launch(16, 4096) == DecodeLaunch(2, 32, 4, 3)
    assert backend.graph_decode_launch(32, 4096) == DecodeLaunch(backend.decode_splits(32, 4096))


def test_the_tuning_runs_every_candidate_on_scattered_tables_and_keeps_the_fastest() -> None:
    """The timing loop end to end on the CPU, every launch a real (interpreted) kernel run; only
    the clock is the test's: a GPU's CUDA-graph replay timer cannot run here."""
    from gpu_worker.attention_tuning import _time_launches
    from gpu_worker.backends.triton_backend import TritonBackend

    backend = TritonBackend(torch.device("cpu"), num_kv_heads=2, sliding_window=None, num_q_heads=8)
    fast = DecodeLaunch(2, 32, 4, 3)
    seen: list[tuple[DecodeLaunch, list[torch.Tensor]]] = []

    def timer(launch, fn, tables):
        for t in tables:
            assert not torch.isnan(fn(t)).any()
        seen.append((launch, tables))
        return 0.5 if launch == fast else 1.0

    chosen = _time_launches(backend, [1, 2], 8, 2, 64, torch.float32, 16, 64, timer=timer)
    assert chosen == {1: fast, 2: fast}
    for launch, tables in seen:
        for t in tables:
            assert t.dtype == torch.int32 and bool((t > 0).all())  # never the null block
        blocks = torch.cat([t.flatten() for t in tables])
        assert len(set(blocks.tolist())) == blocks.numel()  # the sets read different blocks
    assert {launch for launch, _ in seen} == set(candidates(1, 64))  # 1 split by default here

    def slow(launch, fn, tables):
        return 0.98 if launch != DecodeLaunch(1) else 1.0  # within the margin: not worth a change

    assert _time_launches(backend, [1], 8, 2, 64, torch.float32, 16, 64, timer=slow) == {}
