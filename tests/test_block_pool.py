"""BlockPool, FreeBlockQueue and block hashing: exact ids and exact free-queue order."""

from __future__ import annotations

import hashlib
import struct

import pytest

from scheduler_svc.block_hash import extend_block_hashes, hash_block_tokens
from scheduler_svc.block_pool import BlockPool, FreeBlockQueue, KVBlock


def queue_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_queue]


def ids(blocks: list[KVBlock]) -> list[int]:
    return [block.block_id for block in blocks]


# -- hashing ---------------------------------------------------------------------------------


def test_hash_is_16_bytes_deterministic_and_chained() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert isinstance(first, bytes) and len(first) == 16
    assert first == hash_block_tokens(None, (1, 2, 3, 4))
    assert first != hash_block_tokens(None, [1, 2, 3, 5])
    # Same block content under different parents must differ: the hash covers the prefix.
    assert hash_block_tokens(first, [9, 9]) != hash_block_tokens(None, [9, 9])
    assert hash_block_tokens(first, [9, 9]) != hash_block_tokens(hash_block_tokens(None, [1]), [9, 9])


def test_hash_byte_layout_is_little_endian_int32_after_parent() -> None:
    """Pinned layout, so digests are stable across processes, versions and machines."""
    parent = bytes(range(16))
    expected = hashlib.blake2b(digest_size=16, person=b"pdserve-kvblock")
    expected.update(parent)
    expected.update(struct.pack("<3i", 7, -1, 70000))
    assert hash_block_tokens(parent, [7, -1, 70000]) == expected.digest()


def test_extend_block_hashes_is_incremental_and_only_full_blocks() -> None:
    tokens = list(range(10))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, block_size=4, num_tokens=7)  # one full block in [:7]
    assert hashes == [hash_block_tokens(None, [0, 1, 2, 3])]
    extend_block_hashes(hashes, tokens, block_size=4, num_tokens=100)  # clamped to len 10
    assert hashes == [
        hash_block_tokens(None, [0, 1, 2, 3]),
        hash_block_tokens(hashes[0], [4, 5, 6, 7]),
    ]
    before = list(hashes)
    extend_block_hashes(hashes, tokens, block_size=4, num_tokens=8)
    assert hashes == before  # nothing new to hash


# -- free queue ------------------------------------------------------------------------------


def test_free_queue_popleft_append_remove_middle_and_order() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert len(queue) == 5 and [b.block_id for b in queue] == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4] and len(queue) == 4
    assert blocks[2] not in queue and blocks[3] in queue
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    queue.append(blocks[0])
    assert [b.block_id for b in queue] == [1, 3, 4, 2, 0]
    with pytest.raises(ValueError):
        queue.append(blocks[0])
    for expected in [1, 3, 4, 2, 0]:
        assert queue.popleft().block_id == expected
    assert len(queue) == 0 and list(queue) == []
    with pytest.raises(IndexError):
        queue.popleft()
    with pytest.raises(ValueError):
        queue.remove(blocks[0])


# -- pool ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [-1, 0, 1])
def test_pool_needs_a_usable_block(num_blocks: int) -> None:
    with pytest.raises(ValueError, match="null block"):
        BlockPool(num_blocks)


def test_null_block_is_reserved_and_initial_queue_ascending() -> None:
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4
    assert pool.num_free_blocks == 4 and pool.num_used_blocks == 0
    assert queue_ids(pool) == [1, 2, 3, 4]
    assert ids(pool.get_new_blocks(4)) == [1, 2, 3, 4]
    assert pool.null_block.block_id == 0 and pool.null_block.ref_cnt == 0
    with pytest.raises(ValueError):
        pool.touch([pool.null_block])


def test_get_new_blocks_pops_head_and_refuses_overdraw() -> None:
    pool = BlockPool(6)
    got = pool.get_new_blocks(2)
    assert ids(got) == [1, 2] and [b.ref_cnt for b in got] == [1, 1]
    assert pool.num_free_blocks == 3 and pool.num_used_blocks == 2
    with pytest.raises(ValueError, match="only 3 are free"):
        pool.get_new_blocks(4)
    assert queue_ids(pool) == [3, 4, 5]  # the refused call changed nothing


def test_free_appends_in_given_order_and_lru_reuse() -> None:
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)  # 1, 2, 3
    pool.free_blocks(list(reversed(a)))
    assert queue_ids(pool) == [4, 5, 3, 2, 1]
    assert ids(pool.get_new_blocks(3)) == [4, 5, 3]
    assert queue_ids(pool) == [2, 1]
    with pytest.raises(ValueError, match="double free"):
        pool.free_blocks([KVBlock(9)])


def test_cached_block_stays_findable_until_evicted_lru_first() -> None:
    pool = BlockPool(4)  # usable 1, 2, 3
    b1, b2, b3 = pool.get_new_blocks(3)
    h1, h2 = b"h1".ljust(16, b"\0"), b"h2".ljust(16, b"\0")
    pool.cache_full_block(b1, h1)
    pool.cache_full_block(b2, h2)
    pool.free_blocks([b2, b1, b3])
    assert queue_ids(pool) == [2, 1, 3]
    assert pool.num_free_blocks == 3 and pool.num_cached_free_blocks == 2
    assert pool.get_cached_block(h1) is b1 and pool.get_cached_block(h2) is b2

    # Allocation evicts from the head: block 2 (hash h2) goes first, h1 survives.
    assert ids(pool.get_new_blocks(1)) == [2]
    assert pool.get_cached_block(h2) is None and b2.block_hash is None
    assert pool.get_cached_block(h1) is b1 and pool.num_cached_free_blocks == 1


def test_touch_revives_a_free_cached_block_and_shares_ref_counts() -> None:
    pool = BlockPool(5)
    b1, b2 = pool.get_new_blocks(2)
    h = bytes(16)
    pool.cache_full_block(b1, h)
    pool.touch([b1])  # a second request shares it
    assert b1.ref_cnt == 2
    pool.free_blocks([b2, b1])
    assert b1.ref_cnt == 1 and queue_ids(pool) == [3, 4, 2]
    pool.free_blocks([b1])
    assert queue_ids(pool) == [3, 4, 2, 1] and pool.num_cached_free_blocks == 1
    pool.touch([pool.get_cached_block(h)])  # hit on a free block: leaves the queue
    assert b1.ref_cnt == 1 and queue_ids(pool) == [3, 4, 2]
    assert pool.num_cached_free_blocks == 0 and pool.num_used_blocks == 1


def test_duplicate_hash_keeps_existing_mapping() -> None:
    pool = BlockPool(4)
    b1, b2 = pool.get_new_blocks(2)
    h = b"same".ljust(16, b"\0")
    pool.cache_full_block(b1, h)
    pool.cache_full_block(b2, h)
    assert pool.get_cached_block(h) is b1 and b1.block_hash == h and b2.block_hash is None


def test_reset_prefix_cache_only_when_nothing_is_used() -> None:
    pool = BlockPool(4)
    (b1,) = pool.get_new_blocks(1)
    h = b"x".ljust(16, b"\0")
    pool.cache_full_block(b1, h)
    assert pool.reset_prefix_cache() is False and pool.get_cached_block(h) is b1
    pool.free_blocks([b1])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h) is None and b1.block_hash is None
    assert pool.num_cached_free_blocks == 0 and queue_ids(pool) == [2, 3, 1]


def test_caching_disabled_never_hashes() -> None:
    pool = BlockPool(3, enable_caching=False)
    (b1,) = pool.get_new_blocks(1)
    pool.cache_full_block(b1, bytes(16))
    assert b1.block_hash is None and pool.get_cached_block(bytes(16)) is None
