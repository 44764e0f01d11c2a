"""Where a request runs: KV-aware choice of a worker, and of a decode worker after a prefill.

Pure functions over worker slots; the cost functions are documented in docs/architecture.md:
- a prefill (or a whole request on a mixed/decode worker) goes where its prompt finishes first:
  (uncached prompt tokens + tokens the worker has queued) / step token budget, plus, for a
  worker that will also decode it, the share of its sequence slots in use;
- a prefilled request goes to the decode worker with the least
  TRANSFER_WEIGHT x (share of its blocks that must be copied) + (share of sequence slots in use):
  a worker that already caches a shared system prompt wins among similarly loaded workers, but
  decode load, which every step pays, dominates a transfer, which is paid once.
A prompt whose uncached part is below `max_local_prefill_tokens` is not split: shipping its KV
would cost more than computing it where it decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.messages import WorkerRole
from scheduler_svc.block_hash import BlockHash
from scheduler_svc.worker_slot import WorkerSlot


# Copying a request's whole KV weighs as much as a quarter of a worker's sequence slots in use.
TRANSFER_WEIGHT = 0.25


@dataclass(frozen=True)
class Route:
    slot: WorkerSlot
    split: bool  # prefill on `slot`, then hand the KV to a decode worker
    cached_tokens: int  # prompt tokens `slot` already caches


def decode_targets(slots: Sequence[WorkerSlot]) -> list[WorkerSlot]:
    """Ready workers a prefilled request may move to: decode workers, else mixed ones."""
    ready = [s for s in slots if s.is_routable]
    decode = [s for s in ready if s.role == WorkerRole.DECODE]
    return decode or [s for s in ready if s.role == WorkerRole.MIXED]


def choose_route(
    slots: Sequence[WorkerSlot], hashes: Sequence[BlockHash], num_tokens: int,
    max_local_prefill_tokens: int,
) -> Route | None:
    """The worker a new (or migrated) request starts on, and whether its prefill is split off.

    `hashes` are the chained hashes of the request's full blocks (all workers share one block
    size, checked at registration). None when no worker is ready.
    """
    # Workers may have different context lengths (each one's cache caps it): only those that can
    # hold the request and one more token are candidates.
    ready = [s for s in slots if s.is_routable and num_tokens < s.hello.max_model_len]
    if not ready:
        return None
    prefill = [s for s in ready if s.role == WorkerRole.PREFILL]
    whole = [s for s in ready if s.role != WorkerRole.PREFILL] or prefill
    best_whole = min(whole, key=lambda s: _whole_cost(s, hashes, num_tokens))
    uncached_there = num_tokens - _cached_tokens(best_whole, hashes, num_tokens)
    if prefill and decode_targets(ready) and uncached_there >= max(1, max_local_prefill_tokens):
        best = min(prefill, key=lambda s: _prefill_cost(s, hashes, num_tokens))
        return Route(best, True, _cached_tokens(best, hashes, num_tokens))
    return Route(best_whole, False, num_tokens - uncached_there)


def decode_ranking(
    slots: Sequence[WorkerSlot], hashes: Sequence[BlockHash], num_kv_tokens: int
) -> list[WorkerSlot]:
    """Decode targets for a prefilled request, best first (the caller reserves in this order)."""
    targets = decode_targets(slots)
    num_blocks = max(1, -(-num_kv_tokens // targets[0].kv.block_size)) if targets else 1

    def cost(slot: WorkerSlot) -> tuple[float, int]:
        hit = slot.kv.count_cached_prefix(hashes[: num_kv_tokens // slot.kv.block_size])
        copy_share = (num_blocks - hit) / num_blocks
        load = (len(slot.scheduler.running) + len(slot.scheduler.incoming)) / slot.scheduler.settings.max_num_seqs
        return TRANSFER_WEIGHT * copy_share + load, slot.num_seqs

    return sorted(targets, key=cost)


def _cached_tokens(slot: WorkerSlot, hashes: Sequence[BlockHash], num_tokens: int) -> int:
    """Prompt tokens found in the slot's prefix cache (at most num_tokens - 1, as admission)."""
    bs = slot.kv.block_size
    usable = max(0, num_tokens - 1) // bs
    return slot.kv.count_cached_prefix(hashes[:usable]) * bs


def _prefill_cost(slot: WorkerSlot, hashes: Sequence[BlockHash], num_tokens: int) -> tuple[float, int]:
    uncached = num_tokens - _cached_tokens(slot, hashes, num_tokens)
    budget = slot.scheduler.settings.max_num_batched_tokens
    return (uncached + slot.num_pending_tokens) / budget, slot.num_seqs


def _whole_cost(slot: WorkerSlot, hashes: Sequence[BlockHash], num_tokens: int) -> tuple[float, int]:
    steps, seqs = _prefill_cost(slot, hashes, num_tokens)
    return steps + seqs / slot.scheduler.settings.max_num_seqs, seqs
