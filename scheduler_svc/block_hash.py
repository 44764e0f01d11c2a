"""Chained content hashes of full KV-cache blocks, the keys of the prefix cache.

A block's hash covers its own token ids *and* its parent's hash, so equal hashes mean
equal whole prefixes, not just equal blocks. Hashes are plain blake2b digests over a
fixed byte layout (little-endian int32 token ids), hence identical in every process
and on every machine; Python's salted ``hash()`` would not be.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from typing import Sequence

BlockHash = bytes
"""A 16-byte blake2b digest identifying one full block together with its whole prefix."""

BLOCK_HASH_SIZE = 16

# Stands in for the parent of a prompt's first block. A real parent is a blake2b digest,
# so colliding with sixteen zero bytes is as unlikely as any other collision.
_NO_PARENT = bytes(BLOCK_HASH_SIZE)
# Domain separation: these digests cannot be confused with other blake2b uses.
_PERSON = b"pdserve-kvblock"

if array("i").itemsize != 4:  # pragma: no cover - every supported platform has 4-byte C ints
    raise ImportError("block_hash needs a 4-byte array('i') to pack token ids as int32")
_NEEDS_BYTESWAP = sys.byteorder != "little"


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash one block's token ids chained onto the hash of the block before it.

    ``parent`` is None for the first block of a sequence. Token ids must fit in int32.
    """
    packed = array("i", token_ids)
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts only
        packed.byteswap()
    digest = hashlib.blake2b(digest_size=BLOCK_HASH_SIZE, person=_PERSON)
    digest.update(_NO_PARENT if parent is None else parent)
    digest.update(packed.tobytes())
    return digest.digest()


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, num_tokens: int
) -> None:
    """Append the hashes of the full blocks of ``token_ids[:num_tokens]`` not hashed yet.

    Incremental so that a growing sequence is hashed once per block overall: the blocks
    already in ``hashes`` are skipped and the new ones chain from ``hashes[-1]``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_full_blocks = max(0, min(num_tokens, len(token_ids))) // block_size
    parent = hashes[-1] if hashes else None
    for index in range(len(hashes), num_full_blocks):
        start = index * block_size
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
