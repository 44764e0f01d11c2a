"""Per-worker paged KV-cache bookkeeping: which blocks each request holds, and prefix reuse.

The scheduler asks three things of it every step: how much of a new prompt is already
cached (``get_computed_blocks``), whether a request's table can grow to cover the tokens
it is about to run (``allocate_slots``, all or nothing), and to release a finished or
preempted request (``free``). No tensors live here, only block ids.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from scheduler_svc.block_hash import BlockHash, extend_block_hashes
from scheduler_svc.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock


class KVIntegrityError(AssertionError):
    """The block accounting contradicts itself (a bug, never a capacity condition)."""


class KVCacheManager:
    """Block tables of all live requests of one worker, on top of a ``BlockPool``."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._tables: dict[str, list[KVBlock]] = {}
        # Chained hashes of each request's full blocks, grown incrementally. May exist for
        # a request that has no table yet (looked up, not admitted): ``free`` drops it.
        self._hashes: dict[str, list[BlockHash]] = {}
        # How many leading table blocks have been offered to the prefix cache already.
        self._num_cached: dict[str, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up, cumulative
        self.prefix_cache_hits = 0  # of those, tokens found cached

    # -- queries ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by live requests; a warm but idle cache counts 0."""
        return self.pool.num_used_blocks / self.pool.num_usable_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._tables.get(request_id, ())]

    # -- scheduling -------------------------------------------------------------------------

    def get_computed_blocks(self, request_id: str, token_ids: Sequence[int]) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a prompt about to be admitted, and its length in tokens.

        Stops at the first miss, since later blocks' hashes chain through the missing one.
        At most ``len(token_ids) - 1`` tokens count: the last prompt token must run to
        produce logits, so a fully cached prompt gives back its last block. Nothing is
        referenced yet; pass the result to ``allocate_slots`` before any other allocation
        (which could evict these blocks). Not counted in the hit statistics when prefix
        caching is disabled.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        max_hit_blocks = max(0, len(token_ids) - 1) // bs
        hashes = self._hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, token_ids, bs, max_hit_blocks * bs)
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * bs
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_new_tokens: int,
        num_computed_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        cache_blocks: bool = True,
    ) -> list[int] | None:
        """Grow the request's table to cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``new_computed_blocks`` (prefix hits, new requests only) go to the front of the
        table. Returns the ids appended by this call (hits first), or None, with nothing
        changed, when the free blocks do not suffice. Afterwards every block whose tokens
        are all known (``token_ids`` may lag behind the covered range) is offered to the
        prefix cache: the step being planned writes their KV before any later step can read
        it, since a worker runs its steps in order. Blocks filled some other way (a KV
        transfer) pass ``cache_blocks=False`` and are offered by ``cache_blocks`` once written.
        """
        if num_new_tokens < 0 or num_computed_tokens < 0:
            raise ValueError(f"negative token counts ({num_new_tokens=}, {num_computed_tokens=})")
        bs = self.block_size
        table = self._tables.get(request_id)
        if new_computed_blocks and table:
            raise ValueError(f"prefix hits given for {request_id!r}, which already holds blocks")
        num_held = len(table) if table is not None else 0
        num_covered = num_computed_tokens + num_new_tokens
        num_needed_blocks = -(-num_covered // bs)
        num_to_allocate = max(0, num_needed_blocks - num_held - len(new_computed_blocks))

        if new_computed_blocks:
            self._check_hits_still_cached(request_id, token_ids, new_computed_blocks)
        # A hit that sits in the free queue is counted in num_free_blocks but is about to
        # be taken by this very request, so it cannot also serve as a fresh block.
        num_hits_in_free_queue = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_to_allocate > self.pool.num_free_blocks - num_hits_in_free_queue:
            return None

        if table is None:
            table = self._tables[request_id] = []
            self._num_cached[request_id] = 0
        self.pool.touch(new_computed_blocks)
        table.extend(new_computed_blocks)
        if new_computed_blocks:
            # Hit blocks are cached by definition; skip them when caching below.
            self._num_cached[request_id] = len(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_to_allocate)
        table.extend(new_blocks)

        if self.enable_prefix_caching and cache_blocks:
            self._cache_full_blocks(request_id, token_ids, min(len(token_ids), num_covered))
        return [block.block_id for block in new_computed_blocks] + [block.block_id for block in new_blocks]

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_written_tokens: int) -> None:
        """Offer the request's full blocks within its first ``num_written_tokens`` tokens, whose
        KV now exists on the worker, to the prefix cache (see ``allocate_slots``)."""
        if self.enable_prefix_caching and request_id in self._tables:
            self._cache_full_blocks(request_id, token_ids, min(len(token_ids), num_written_tokens))

    def count_cached_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of these chained hashes this worker caches (a read-only look
        for routing: no statistics, nothing referenced)."""
        if not self.enable_prefix_caching:
            return 0
        count = 0
        for block_hash in block_hashes:
            if self.pool.get_cached_block(block_hash) is None:
                break
            count += 1
        return count

    def free(self, request_id: str, content_lost: bool = False) -> None:
        """Release a finished, aborted or preempted request; unknown ids are ignored.

        Blocks go back tail first, so under memory pressure the end of a cached prefix is
        evicted before its head and the shared head survives longest. With content_lost (the
        step that should have filled them failed) its unshared blocks also leave the prefix
        cache, so no later request reuses KV that was never written.
        """
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))
            if content_lost:
                for block in table:
                    if block.ref_cnt == 0:
                        self.pool.uncache_block(block)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; False (nothing done) while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    def _cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_known_tokens: int) -> None:
        num_full = num_known_tokens // self.block_size
        first = self._num_cached[request_id]
        if num_full <= first:
            return
        hashes = self._hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, token_ids, self.block_size, num_full * self.block_size)
        table = self._tables[request_id]
        for index in range(first, num_full):
            self.pool.cache_full_block(table[index], hashes[index])
        self._num_cached[request_id] = num_full

    def _check_hits_still_cached(
        self, request_id: str, token_ids: Sequence[int], hits: Sequence[KVBlock]
    ) -> None:
        """Refuse hits that were evicted since the lookup: reusing them would read foreign KV."""
        hashes = self._hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, token_ids, self.block_size, len(hits) * self.block_size)
        if len(hashes) < len(hits):
            raise ValueError(f"{len(hits)} prefix hits for {request_id!r} exceed its full prompt blocks")
        for block, expected in zip(hits, hashes):
            if block.block_hash != expected or self.pool.get_cached_block(expected) is not block:
                raise ValueError(
                    f"prefix hit {block!r} for {request_id!r} is no longer cached; "
                    "allocate right after get_computed_blocks"
                )

    # -- integrity --------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Full scan of the accounting; raises KVIntegrityError naming the first contradiction.

        O(num_blocks + total table length): for tests and debugging, not the hot path.
        """
        pool = self.pool
        usable = pool.blocks[1:]

        # Free queue: walk the raw links, every node once, back links consistent.
        queued: set[int] = set()
        head, tail = pool.free_queue.head_sentinel, pool.free_queue.tail_sentinel
        prev, node = head, head.next_free
        while node is not tail:
            if node is None:
                raise KVIntegrityError(f"free queue broken after {prev!r}: next link is None")
            if node.prev_free is not prev:
                raise KVIntegrityError(
                    f"free queue back link of {node!r} is {node.prev_free!r}, expected {prev!r}"
                )
            if node.block_id in queued:
                raise KVIntegrityError(f"{node!r} appears twice in the free queue")
            if node.block_id == NULL_BLOCK_ID:
                raise KVIntegrityError("the null block is in the free queue")
            if pool.blocks[node.block_id] is not node:
                raise KVIntegrityError(f"free queue holds {node!r}, which is not the pool's block")
            queued.add(node.block_id)
            if len(queued) > pool.num_blocks:
                raise KVIntegrityError("free queue has a cycle")
            prev, node = node, node.next_free
        if tail.prev_free is not prev:
            raise KVIntegrityError(f"free queue tail points at {tail.prev_free!r}, last node is {prev!r}")
        if len(queued) != len(pool.free_queue):
            raise KVIntegrityError(
                f"free queue length says {len(pool.free_queue)} but holds {len(queued)} blocks"
            )

        # Ref counts against the request tables.
        holders: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            ids = [block.block_id for block in table]
            if len(set(ids)) != len(ids):
                raise KVIntegrityError(f"request {request_id!r} holds a block twice: {ids}")
            if NULL_BLOCK_ID in ids:
                raise KVIntegrityError(f"request {request_id!r} holds the null block")
            for block in table:
                if pool.blocks[block.block_id] is not block:
                    raise KVIntegrityError(f"request {request_id!r} holds {block!r}, not the pool's block")
            holders.update(ids)
        null = pool.null_block
        if null.ref_cnt != 0 or null.block_hash is not None or null.prev_free or null.next_free:
            raise KVIntegrityError(f"the null block was touched: {null!r}")

        num_free = num_used = num_cached = 0
        for block in usable:
            if block.ref_cnt != holders[block.block_id]:
                raise KVIntegrityError(
                    f"{block!r} has ref_cnt {block.ref_cnt} but {holders[block.block_id]} tables hold it"
                )
            if block.ref_cnt == 0:
                if block.block_id not in queued:
                    raise KVIntegrityError(f"{block!r} has ref 0 but is not in the free queue")
                if block.block_hash is None:
                    num_free += 1
                else:
                    num_cached += 1
            else:
                if block.block_id in queued:
                    raise KVIntegrityError(f"{block!r} is held but also in the free queue")
                num_used += 1
        if num_free + num_used + num_cached != len(usable):
            raise KVIntegrityError(
                f"free {num_free} + used {num_used} + cached {num_cached} != usable {len(usable)}"
            )
        if num_cached != pool.num_cached_free_blocks:
            raise KVIntegrityError(
                f"pool counts {pool.num_cached_free_blocks} cached free blocks, scan finds {num_cached}"
            )

        # Prefix-cache map and block hashes agree both ways.
        for block_hash, block in pool.cached_blocks.items():
            if block.block_hash != block_hash:
                raise KVIntegrityError(
                    f"hash map key {block_hash.hex()} points at {block!r} with another hash"
                )
        for block in usable:
            if block.block_hash is not None and pool.cached_blocks.get(block.block_hash) is not block:
                raise KVIntegrityError(f"{block!r} carries a hash that the hash map does not map to it")
