"""The KV block copy (gpu_worker.kv_transfer.block_copy): the Triton kernel against a per-block
torch reference on the CPU, through Triton's interpreter, and the torch fallback.

TRITON_INTERPRET=1 is set only while a kernel test runs (monkeypatch puts it back), as in
tests/test_triton_kernels.py. block_copy builds its kernel at the first call under each setting
(triton decides at decoration whether a function is interpreted), so no import-time setting is
needed and other test modules never see the variable.

Every destination starts as NaN: a block the copy must not touch has to come out NaN, bit for
bit, and every compared tensor is compared as integers (a NaN never equals itself as a float).
Block ids are shuffled, so neither side is a contiguous or ordered run. bfloat16 runs in the
interpreter as well: a copy only loads and stores the 16-bit patterns, which the interpreter
(which keeps bfloat16 as raw uint16) moves unchanged.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.kv_transfer import block_copy
from gpu_worker.kv_transfer.block_copy import choose_backend, copy_blocks, prepare, upload_ids

ROOT = Path(__file__).resolve().parent.parent
LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 8
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_cache(num_blocks: int, dtype: torch.dtype = torch.float32, seed: int = 0, *,
               block_size: int = BLOCK_SIZE, heads: int = HEADS, head_dim: int = HEAD_DIM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, 2, num_blocks, block_size, heads, head_dim)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def poisoned_like(src: torch.Tensor, num_blocks: int) -> torch.Tensor:
    shape = list(src.shape)
    shape[2] = num_blocks
    return torch.full(shape, float("nan"), dtype=src.dtype)


def shuffled_pairs(num_src: int, num_dst: int, n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    src_ids, dst_ids = rng.sample(range(num_src), n), rng.sample(range(num_dst), n)
    assert src_ids != sorted(src_ids) and dst_ids != sorted(dst_ids)  # really shuffled
    return src_ids, dst_ids


def reference(src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> torch.Tensor:
    """What dst must become: one block at a time, no index kernels involved."""
    out = dst.clone()
    for s, d in zip(src_ids, dst_ids):
        out[:, :, d] = src[:, :, s]
    return out


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    itype = INT_OF[actual.dtype]
    assert torch.equal(actual.contiguous().view(itype), expected.contiguous().view(itype))


def assert_copied(src, dst, expected, src_ids, dst_ids) -> None:
    """dst equals the reference bit for bit: the listed blocks hold their sources, the rest NaN."""
    assert_bits_equal(dst, expected)
    for s, d in zip(src_ids, dst_ids):
        assert_bits_equal(dst[:, :, d], src[:, :, s])
    untouched = sorted(set(range(dst.shape[2])) - set(dst_ids))
    assert untouched and torch.isnan(dst[:, :, untouched]).all()


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------------- the Triton kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_kernel_copies_shuffled_blocks_and_nothing_else(interpret, dtype: torch.dtype) -> None:
    src = make_cache(13, dtype, seed=1)
    dst = poisoned_like(src, 17)  # more blocks than the source
    src_ids, dst_ids = shuffled_pairs(13, 17, 7, seed=2)
    expected = reference(src, dst, src_ids, dst_ids)
    src_before = src.clone()
    assert copy_blocks(src, dst, src_ids, dst_ids, backend="triton") == "triton"
    assert_copied(src, dst, expected, src_ids, dst_ids)
    assert_bits_equal(src, src_before)  # the source is only read


def test_kernel_copies_into_a_cache_with_fewer_blocks(interpret) -> None:
    src = make_cache(20, torch.float16, seed=3)
    dst = poisoned_like(src, 6)
    src_ids, dst_ids = [19, 0, 7, 12], [5, 2, 0, 3]
    expected = reference(src, dst, src_ids, dst_ids)
    copy_blocks(src, dst, src_ids, dst_ids, backend="triton")
    assert_copied(src, dst, expected, src_ids, dst_ids)


@pytest.mark.parametrize("block_size,heads,head_dim", [(3, 1, 5), (1, 3, 7)], ids=["slab15", "slab21"])
def test_kernel_masks_a_slab_that_is_no_power_of_two(interpret, block_size, heads, head_dim) -> None:
    src = make_cache(9, torch.float32, seed=4, block_size=block_size, heads=heads, head_dim=head_dim)
    dst = poisoned_like(src, 11)
    src_ids, dst_ids = shuffled_pairs(9, 11, 5, seed=15)
    expected = reference(src, dst, src_ids, dst_ids)
    copy_blocks(src, dst, src_ids, dst_ids, backend="triton")
    assert_copied(src, dst, expected, src_ids, dst_ids)


@pytest.mark.parametrize("block_size,head_dim,tile", [(4, 8, 16), (3, 5, 16), (4, 8, 64)],
                         ids=["even-4-tiles", "masked-tail", "one-tile"])
def test_kernel_loops_over_tiles_of_a_slab(interpret, block_size: int, head_dim: int, tile: int) -> None:
    """A slab larger than the tile (64 elements in 4 tiles of 16, or 30 in 2) takes several
    iterations; the last one is masked where the tile does not divide the slab."""
    src = make_cache(8, torch.float32, seed=6, block_size=block_size, head_dim=head_dim)
    dst = poisoned_like(src, 10)
    src_ids, dst_ids = shuffled_pairs(8, 10, 6, seed=7)
    expected = reference(src, dst, src_ids, dst_ids)
    block_copy._load_triton()
    block_copy._copy_triton(src, dst, upload_ids(src_ids, dst_ids, dst.device, torch.int32), tile=tile)
    assert_copied(src, dst, expected, src_ids, dst_ids)


def test_kernel_follows_each_caches_own_strides(interpret) -> None:
    """Views whose layer, K/V and block strides differ from a contiguous cache's (and from each
    other's), with contiguous slabs, as the kernel requires."""
    big_src = make_cache(30, torch.float16, seed=8)
    src = big_src[:, :, 5:19]  # 14 blocks inside a 30-block allocation
    dst_storage = torch.full((LAYERS, 2, 25, BLOCK_SIZE, HEADS, HEAD_DIM), float("nan"), dtype=torch.float16)
    dst = dst_storage[:, :, 3:15]  # 12 blocks; the blocks around them must stay NaN too
    assert not src.is_contiguous() and not dst.is_contiguous() and src.stride(0) != dst.stride(0)
    src_ids, dst_ids = shuffled_pairs(14, 12, 8, seed=9)
    expected = reference(src, dst, src_ids, dst_ids)
    copy_blocks(src, dst, src_ids, dst_ids, backend="triton")
    assert_copied(src, dst, expected, src_ids, dst_ids)
    outside = list(range(3)) + list(range(15, 25))
    assert torch.isnan(dst_storage[:, :, outside]).all()


def test_kernel_refuses_slabs_that_are_not_contiguous(interpret) -> None:
    src = make_cache(6).permute(0, 1, 2, 3, 5, 4).contiguous().permute(0, 1, 2, 3, 5, 4)  # heads innermost
    dst = make_cache(6)
    with pytest.raises(ValueError, match="contiguous"):
        copy_blocks(src, dst, [1], [2], backend="triton")
    assert choose_backend(src, dst) == "torch"


def test_kernel_on_a_cpu_cache_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    src, dst = make_cache(4), make_cache(4, seed=1)
    before = dst.clone()
    with pytest.raises(ValueError, match="CUDA"):
        copy_blocks(src, dst, [0], [1], backend="triton")
    assert torch.equal(dst, before)


# ---------------------------------------------------------------------------- torch path, checks


@pytest.mark.parametrize("chunk", [None, 1, 2, 100], ids=["whole", "chunk1", "chunk2", "chunk100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_torch_fallback_on_cpu_matches_the_reference(dtype: torch.dtype, chunk: int | None) -> None:
    src = make_cache(13, dtype, seed=10)
    dst = poisoned_like(src, 17)
    src_ids, dst_ids = shuffled_pairs(13, 17, 7, seed=11)
    expected = reference(src, dst, src_ids, dst_ids)
    assert choose_backend(src, dst) == "torch"  # a CPU cache never takes the kernel by default
    assert copy_blocks(src, dst, src_ids, dst_ids, max_chunk_blocks=chunk) == "torch"
    assert_copied(src, dst, expected, src_ids, dst_ids)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_copy_writes_nothing(interpret, backend: str) -> None:
    src, dst = make_cache(4), make_cache(5, seed=1)
    before = dst.clone()
    assert copy_blocks(src, dst, [], [], backend=backend) == backend
    assert torch.equal(dst, before)


@pytest.mark.parametrize("src_kw,dst_kw,src_ids,dst_ids,message", [
    ({"dtype": torch.float16}, {}, [0], [0], "dtypes differ"),
    ({"head_dim": 4}, {}, [0], [0], "layouts differ"),
    ({}, {}, [0, 1], [0], "2 source blocks but 1"),
    ({}, {}, [6], [0], "source block ids out of range"),
    ({}, {}, [0], [-1], "destination block ids out of range"),
], ids=["dtype", "layout", "lengths", "src-range", "dst-range"])
def test_a_bad_copy_is_refused_before_any_write(src_kw, dst_kw, src_ids, dst_ids, message) -> None:
    src, dst = make_cache(6, **src_kw), make_cache(7, seed=1, **dst_kw)
    before = dst.clone()
    with pytest.raises(ValueError, match=message):
        copy_blocks(src, dst, src_ids, dst_ids)
    assert torch.equal(dst, before)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown block copy backend"):
        copy_blocks(make_cache(2), make_cache(2), [0], [1], backend="cuda")


def test_prepare_on_cpu_picks_torch_and_writes_nothing() -> None:
    src, dst = make_cache(3), make_cache(3, seed=1)
    before = dst.clone()
    assert prepare(src, dst) == "torch"
    assert torch.equal(dst, before)


def test_upload_ids_stacks_both_lists_in_one_tensor() -> None:
    ids = upload_ids([4, 1, 9], [0, 7, 2], torch.device("cpu"), torch.int32)
    assert ids.dtype == torch.int32 and ids.tolist() == [[4, 1, 9], [0, 7, 2]]


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def test_importing_kv_transfer_does_not_import_triton() -> None:
    done = _run_python("import sys, gpu_worker.kv_transfer; print('triton' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_without_triton_the_copy_falls_back_to_torch() -> None:
    """Where triton is not installed (an import of it fails) kv_transfer imports, the default
    backend is torch, and asking for the kernel is a clear error."""
    code = """
import sys
sys.modules['triton'] = None  # makes `import triton` raise ImportError
import torch
from gpu_worker.kv_transfer import KVPuller
from gpu_worker.kv_transfer.block_copy import copy_blocks, triton_available
assert not triton_available()
src = torch.arange(2 * 2 * 4 * 2 * 1 * 3, dtype=torch.float32).reshape(2, 2, 4, 2, 1, 3)
dst = torch.zeros(2, 2, 5, 2, 1, 3)
assert copy_blocks(src, dst, [3, 0], [1, 4]) == 'torch'
assert torch.equal(dst[:, :, 1], src[:, :, 3]) and torch.equal(dst[:, :, 4], src[:, :, 0])
assert torch.equal(dst[:, :, [0, 2, 3]], torch.zeros(2, 2, 3, 2, 1, 3))
try:
    copy_blocks(src, dst, [0], [0], backend='triton')
except ValueError as exc:
    print('refused:', exc)
"""
    done = _run_python(code)
    assert done.returncode == 0, done.stderr
    assert "refused: the triton block copy needs triton" in done.stdout
