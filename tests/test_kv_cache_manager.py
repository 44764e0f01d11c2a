"""KVCacheManager: exact block ids, free order, prefix hits, exhaustion and integrity checks.

Block size 4 throughout so that block boundaries are easy to read off the token lists.
"""

from __future__ import annotations

import pytest

from scheduler_svc.block_hash import extend_block_hashes, hash_block_tokens
from scheduler_svc.kv_cache_manager import KVCacheManager, KVIntegrityError

BS = 4


def queue_ids(kv: KVCacheManager) -> list[int]:
    return [block.block_id for block in kv.pool.free_queue]


def refs(kv: KVCacheManager) -> list[int]:
    return [block.ref_cnt for block in kv.pool.blocks]


def snapshot(kv: KVCacheManager) -> tuple[object, ...]:
    """Everything observable about the accounting, to prove a refused call changed nothing."""
    return (
        queue_ids(kv),
        refs(kv),
        [block.block_hash for block in kv.pool.blocks],
        dict(kv.pool.cached_blocks),
        {rid: kv.block_ids(rid) for rid in kv._tables},
        kv.num_requests,
        kv.pool.num_cached_free_blocks,
    )


def prefill(kv: KVCacheManager, rid: str, prompt: list[int]) -> list[int] | None:
    """Admit a request the way the scheduler does: lookup, then allocate the rest."""
    hits, num_computed = kv.get_computed_blocks(rid, prompt)
    return kv.allocate_slots(rid, prompt, len(prompt) - num_computed, num_computed, hits)


def test_allocation_order_decode_growth_and_caching_of_full_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)  # usable 1..7
    prompt = list(range(100, 110))  # 10 tokens: blocks [4, 4, 2]
    assert prefill(kv, "a", prompt) == [1, 2, 3]
    assert kv.block_ids("a") == [1, 2, 3] and kv.num_requests == 1
    h = []
    extend_block_hashes(h, prompt, BS, len(prompt))
    assert len(h) == 2
    assert kv.pool.get_cached_block(h[0]).block_id == 1
    assert kv.pool.get_cached_block(h[1]).block_id == 2
    assert kv.pool.blocks[3].block_hash is None  # partial block is never hashed

    tokens = prompt + [7]  # first sampled token
    assert kv.allocate_slots("a", tokens, 1, 10) == []  # 11 tokens still fit in 3 blocks
    tokens.append(8)
    assert kv.allocate_slots("a", tokens, 1, 11) == []  # 12 tokens: block 3 is now full
    assert kv.pool.blocks[3].block_hash == hash_block_tokens(h[1], tokens[8:12])
    tokens.append(9)
    assert kv.allocate_slots("a", tokens, 1, 12) == [4]  # 13th token opens block 4
    assert kv.block_ids("a") == [1, 2, 3, 4]
    assert kv.num_free_blocks == 3 and kv.usage == pytest.approx(4 / 7)
    kv.check_integrity()


def test_free_releases_tail_first_and_forgets_request() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert prefill(kv, "a", list(range(10))) == [1, 2, 3]
    kv.free("a")
    assert queue_ids(kv) == [4, 5, 6, 7, 3, 2, 1]
    assert kv.block_ids("a") == [] and kv.num_requests == 0
    kv.free("a")  # unknown / already freed: no-op
    kv.free("never-seen")
    assert queue_ids(kv) == [4, 5, 6, 7, 3, 2, 1]
    kv.check_integrity()


def test_usage_is_zero_when_idle_with_a_warm_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prefill(kv, "a", list(range(12)))
    kv.free("a")
    assert kv.usage == 0.0
    assert kv.num_free_blocks == 7 and kv.pool.num_cached_free_blocks == 3
    kv.check_integrity()


def test_prefix_hit_returns_same_ids_and_shares_blocks_with_ref_2() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(10))
    assert prefill(kv, "a", prompt) == [1, 2, 3]
    hits, num_computed = kv.get_computed_blocks("b", prompt)
    assert [b.block_id for b in hits] == [1, 2] and num_computed == 8
    assert kv.allocate_slots("b", prompt, 2, 8, hits) == [1, 2, 4]
    assert refs(kv)[1:5] == [2, 2, 1, 1]
    kv.check_integrity()

    kv.free("a")  # shared blocks survive with ref 1; only a's private block 3 is freed
    assert refs(kv)[1:5] == [1, 1, 0, 1] and queue_ids(kv) == [5, 6, 7, 3]
    kv.free("b")
    assert queue_ids(kv) == [5, 6, 7, 3, 4, 2, 1]
    kv.check_integrity()


def test_prefix_hit_on_freed_blocks_takes_them_out_of_the_free_queue() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(10))
    prefill(kv, "a", prompt)
    kv.free("a")  # queue [4, 5, 6, 7, 3, 2, 1]
    assert prefill(kv, "b", prompt) == [1, 2, 4]
    assert queue_ids(kv) == [5, 6, 7, 3]
    kv.check_integrity()


def test_last_prompt_token_is_never_counted_as_computed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))  # exactly 2 full blocks
    assert prefill(kv, "a", prompt) == [1, 2]
    hits, num_computed = kv.get_computed_blocks("b", prompt)
    assert [b.block_id for b in hits] == [1] and num_computed == 4  # block 2 handed back
    assert kv.allocate_slots("b", prompt, 4, 4, hits) == [1, 3]
    # One more token makes both blocks count: 8 <= 9 - 1.
    hits, num_computed = kv.get_computed_blocks("c", prompt + [99])
    assert [b.block_id for b in hits] == [1, 2] and num_computed == 8
    # A single-token prompt can never hit.
    assert kv.get_computed_blocks("d", [0]) == ([], 0)
    assert kv.get_computed_blocks("e", []) == ([], 0)


def test_prefix_cache_statistics_count_tokens() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prefill(kv, "a", list(range(10)))
    prefill(kv, "b", list(range(10)))
    assert kv.prefix_cache_queries == 20 and kv.prefix_cache_hits == 8


def test_exhaustion_returns_none_and_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # usable 1..4
    assert prefill(kv, "a", list(range(12))) == [1, 2, 3]
    before = snapshot(kv)
    assert prefill(kv, "b", list(range(50, 59))) is None  # needs 3, 1 free
    assert snapshot(kv) == before
    tokens = list(range(12)) + [1, 2, 3, 4, 5]
    assert kv.allocate_slots("a", tokens, 5, 12) is None  # 17 tokens need 2 more
    assert snapshot(kv) == before and kv.block_ids("a") == [1, 2, 3]
    assert kv.allocate_slots("a", tokens, 4, 12) == [4]  # 16 tokens: exactly one more
    kv.check_integrity()


def test_hit_blocks_in_the_free_queue_are_not_double_counted_as_free() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # usable 1..4
    shared = list(range(12))
    assert prefill(kv, "a", shared) == [1, 2, 3]
    kv.free("a")  # queue [4, 3, 2, 1]
    assert prefill(kv, "x", [90, 91]) == [4]  # queue [3, 2, 1]
    before = snapshot(kv)
    # b hits blocks 1 and 2 (both free) and needs 3 fresh blocks: 3 free, but 2 are its hits.
    b_prompt = shared[:8] + list(range(200, 209))
    hits, num_computed = kv.get_computed_blocks("b", b_prompt)
    assert [blk.block_id for blk in hits] == [1, 2] and kv.num_free_blocks == 3
    assert kv.allocate_slots("b", b_prompt, len(b_prompt) - num_computed, num_computed, hits) is None
    assert snapshot(kv) == before
    # c needs only one fresh block: it evicts cached block 3 (the only non-hit free block).
    assert prefill(kv, "c", shared[:8] + [300, 301, 302, 303]) == [1, 2, 3]
    assert queue_ids(kv) == [] and kv.usage == 1.0
    kv.check_integrity()


def test_eviction_happens_only_when_blocks_are_needed_lru_first() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)  # usable 1..5
    p = list(range(8))
    q = list(range(100, 108))
    prefill(kv, "p", p + [0])  # [1, 2, 3], blocks 1, 2 cached
    prefill(kv, "q", q + [0])  # [4, 5, ...] needs 3 -> only 2 free
    assert kv.block_ids("q") == []
    kv.free("p")  # queue [4, 5, 3, 2, 1]
    assert prefill(kv, "q", q + [0]) == [4, 5, 3]  # uncached 4, 5, then partial 3 (no hash)
    assert kv.pool.num_cached_free_blocks == 2  # p's blocks 1, 2 still cached
    hits, _ = kv.get_computed_blocks("p2", p + [0])
    assert [b.block_id for b in hits] == [1, 2]
    kv.free("q")  # queue [2, 1, 3, 5, 4]
    assert queue_ids(kv) == [2, 1, 3, 5, 4]
    assert prefill(kv, "r", [7, 7]) == [2]  # evicts the *tail* of p's prefix first
    hits, num_computed = kv.get_computed_blocks("p3", p + [0])
    assert [b.block_id for b in hits] == [1] and num_computed == 4
    kv.check_integrity()


def test_hashing_never_runs_ahead_of_known_tokens() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = list(range(7))
    # The scheduler runs ahead: it covers 9 tokens though only 7 are known.
    assert kv.allocate_slots("a", tokens, 9, 0) == [1, 2, 3]
    assert kv.pool.blocks[1].block_hash is not None
    assert kv.pool.blocks[2].block_hash is None  # token 7 unknown: block 2 not full yet
    tokens += [7, 8]
    assert kv.allocate_slots("a", tokens, 1, 9) == []
    expected = hash_block_tokens(hash_block_tokens(None, tokens[:4]), tokens[4:8])
    assert kv.pool.blocks[2].block_hash == expected
    kv.check_integrity()


def test_identical_prompts_admitted_together_keep_one_cache_entry() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    lookups = [kv.get_computed_blocks(rid, prompt) for rid in ("a", "b")]
    assert lookups == [([], 0), ([], 0)]
    assert kv.allocate_slots("a", prompt, 9, 0) == [1, 2, 3]
    assert kv.allocate_slots("b", prompt, 9, 0) == [4, 5, 6]
    assert [kv.pool.blocks[i].block_hash is None for i in (4, 5)] == [True, True]
    kv.check_integrity()
    kv.free("b")
    kv.free("a")
    assert kv.pool.num_cached_free_blocks == 2
    kv.check_integrity()


def test_stale_hit_is_refused() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)  # usable 1, 2
    prefill(kv, "a", list(range(5)))
    kv.free("a")  # queue [2, 1], block 1 cached
    hits, num_computed = kv.get_computed_blocks("b", list(range(5)))
    assert [blk.block_id for blk in hits] == [1]
    assert kv.allocate_slots("c", [50, 51, 52, 53, 54], 5, 0) == [2, 1]  # evicts block 1
    with pytest.raises(ValueError, match="no longer cached"):
        kv.allocate_slots("b", list(range(5)), 1, num_computed, hits)


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(10))
    assert prefill(kv, "a", prompt) == [1, 2, 3]
    assert kv.get_computed_blocks("b", prompt) == ([], 0)
    assert kv.prefix_cache_queries == 0 and kv.prefix_cache_hits == 0
    assert all(block.block_hash is None for block in kv.pool.blocks)
    kv.check_integrity()


def test_reset_prefix_cache_refused_while_requests_hold_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prefill(kv, "a", list(range(9)))
    assert kv.reset_prefix_cache() is False
    kv.free("a")
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks("b", list(range(9))) == ([], 0)
    kv.check_integrity()


# -- check_integrity catches corruption ------------------------------------------------------


@pytest.fixture
def busy() -> KVCacheManager:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prefill(kv, "a", list(range(10)))
    prefill(kv, "b", list(range(10)))  # shares blocks 1, 2
    prefill(kv, "c", list(range(50, 55)))
    kv.free("c")
    kv.check_integrity()
    return kv


def test_integrity_catches_tampered_ref_cnt(busy: KVCacheManager) -> None:
    busy.pool.blocks[1].ref_cnt = 1
    with pytest.raises(KVIntegrityError, match="ref_cnt 1 but 2 tables hold it"):
        busy.check_integrity()


def test_integrity_catches_held_block_in_free_queue(busy: KVCacheManager) -> None:
    busy.pool.free_queue.append(busy.pool.blocks[3])
    with pytest.raises(KVIntegrityError, match="held but also in the free queue"):
        busy.check_integrity()


def test_integrity_catches_broken_queue_links(busy: KVCacheManager) -> None:
    first = busy.pool.free_queue.head_sentinel.next_free
    assert first is not None and first.next_free is not None
    first.next_free.prev_free = busy.pool.blocks[2]
    with pytest.raises(KVIntegrityError, match="back link"):
        busy.check_integrity()


def test_integrity_catches_ref0_block_missing_from_queue(busy: KVCacheManager) -> None:
    busy.pool.free_queue.remove(busy.pool.blocks[7])
    with pytest.raises(KVIntegrityError, match="ref 0 but is not in the free queue"):
        busy.check_integrity()


def test_integrity_catches_wrong_hash_mapping(busy: KVCacheManager) -> None:
    busy.pool.blocks[1].block_hash = bytes(16)
    with pytest.raises(KVIntegrityError, match="another hash"):
        busy.check_integrity()


def test_integrity_catches_duplicate_and_null_blocks_in_a_table(busy: KVCacheManager) -> None:
    table = busy._tables["a"]
    table.append(table[0])
    with pytest.raises(KVIntegrityError, match="holds a block twice"):
        busy.check_integrity()
    table.pop()
    table.append(busy.pool.null_block)
    with pytest.raises(KVIntegrityError, match="null block"):
        busy.check_integrity()


def test_integrity_catches_drifted_cached_counter(busy: KVCacheManager) -> None:
    busy.pool._num_cached_free += 1
    with pytest.raises(KVIntegrityError, match="cached free blocks"):
        busy.check_integrity()
