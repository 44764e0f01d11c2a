"""The pool of fixed-size KV-cache blocks of one worker: ref counts, LRU free queue, prefix cache.

A block whose ref count drops to 0 keeps its content hash and stays findable in the
prefix cache; it is only evicted when ``get_new_blocks`` pops it to hold something
else. The free queue is kept in eviction order (head = evicted first), so freeing
order decides which cached prefixes survive longest.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

from scheduler_svc.block_hash import BlockHash

NULL_BLOCK_ID = 0


class KVBlock:
    """One KV-cache block: its id on the GPU, how many requests hold it, its prefix hash."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Set once the block is full and registered in the prefix cache; cleared on eviction.
        self.block_hash: BlockHash | None = None
        # Links of the free queue; both None while the block is not in it.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else f", hash={self.block_hash.hex()[:8]}"
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """Doubly linked list of ref-0 blocks with O(1) popleft, append and removal from the middle.

    A Python deque cannot remove from the middle in O(1), which a prefix-cache hit on a
    free block needs. The links live in the blocks themselves; two sentinels remove the
    empty-list special cases.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free

    def __contains__(self, block: object) -> bool:
        """O(1): a block is queued exactly when its links are set."""
        return isinstance(block, KVBlock) and block.prev_free is not None

    @property
    def head_sentinel(self) -> KVBlock:
        """For integrity checks that walk the raw links."""
        return self._head

    @property
    def tail_sentinel(self) -> KVBlock:
        return self._tail

    def append(self, block: KVBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"{block!r} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        block.prev_free = last
        block.next_free = self._tail
        last.next_free = block
        self._tail.prev_free = block
        self._len += 1

    def popleft(self) -> KVBlock:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise IndexError("pop from an empty free block queue")
        self.remove(first)
        return first

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block!r} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1


class BlockPool:
    """All blocks of one worker's KV cache plus the prefix-cache map from hash to block.

    Block 0 is a reserved null block (it pads block tables on the GPU): it is never
    handed out, never freed and not counted as usable.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self._hash_to_block: dict[BlockHash, KVBlock] = {}
        # Ref-0 blocks that still carry a hash, kept as a counter so metrics stay O(1).
        self._num_cached_free = 0

    # -- counters ---------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to ``get_new_blocks``: never used plus cached-but-evictable."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request (ref count > 0)."""
        return self.num_usable_blocks - len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return self._num_cached_free

    @property
    def cached_blocks(self) -> Mapping[BlockHash, KVBlock]:
        """Read-only view of the prefix-cache map (for integrity checks and metrics)."""
        return self._hash_to_block

    # -- allocation -------------------------------------------------------------------------

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take ``n`` blocks from the free-queue head (least recently freed first), ref 1 each.

        A popped block that still carries a hash is evicted from the prefix cache here,
        so cached content only disappears when its space is actually needed.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self.free_queue):
            raise ValueError(f"asked for {n} blocks but only {len(self.free_queue)} are free")
        popped: list[KVBlock] = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            popped.append(block)
        return popped

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block (a prefix-cache hit), reviving free ones."""
        for block in blocks:
            if block.block_id == NULL_BLOCK_ID:
                raise ValueError("the null block cannot be referenced")
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
                if block.block_hash is not None:
                    self._num_cached_free -= 1
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block in the given order.

        Blocks reaching ref 0 join the free-queue tail in that same order, keeping their
        hash, so callers pass the blocks they want evicted first before the others.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)
                if block.block_hash is not None:
                    self._num_cached_free += 1

    # -- prefix cache -----------------------------------------------------------------------

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        if not self.enable_caching:
            return None
        return self._hash_to_block.get(block_hash)

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block under its chained hash so later requests can reuse it.

        If another block already holds this hash (two requests computed the same prefix
        concurrently) the existing mapping wins and ``block`` stays unhashed: it is then
        recycled as a plain free block when released.
        """
        if not self.enable_caching or block.block_hash is not None:
            return
        if block.block_id == NULL_BLOCK_ID:
            raise ValueError("the null block cannot be cached")
        if block_hash in self._hash_to_block:
            return
        block.block_hash = block_hash
        self._hash_to_block[block_hash] = block
        if block.ref_cnt == 0:
            self._num_cached_free += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is held by a request,
        because running requests' blocks would otherwise lose their cache registration."""
        if self.num_used_blocks > 0:
            return False
        for block in self._hash_to_block.values():
            block.block_hash = None
        self._hash_to_block.clear()
        self._num_cached_free = 0
        return True

    def uncache_block(self, block: KVBlock) -> None:
        """Make a block unfindable: its content can no longer be trusted (a failed step)."""
        if block.block_hash is None:
            return
        if self._hash_to_block.get(block.block_hash) is block:
            del self._hash_to_block[block.block_hash]
        block.block_hash = None
        if block.ref_cnt == 0:
            self._num_cached_free -= 1

    def _evict(self, block: KVBlock) -> None:
        """Remove a ref-0 block's hash from the prefix cache (it is about to be reused)."""
        assert block.block_hash is not None
        if self._hash_to_block.get(block.block_hash) is block:
            del self._hash_to_block[block.block_hash]
        block.block_hash = None
        self._num_cached_free -= 1
