"""Stateful property test of KVCacheManager against a small scheduler model.

Prompts come from a few shared prefixes over a 3-token vocabulary (so prefix hits are
frequent) and the pool is tiny (so exhaustion and eviction are frequent). After every
operation the full integrity check runs; each rule also checks its own exact effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler_svc.block_pool import KVBlock
from scheduler_svc.kv_cache_manager import KVCacheManager

VOCAB = st.integers(min_value=0, max_value=2)
PREFIXES: list[list[int]] = [
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2],
    [0, 1, 2, 0, 2, 2, 1, 1, 0, 0, 2, 1],
    [1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2],
]


@dataclass
class ModelRequest:
    tokens: list[int]  # known tokens: prompt plus sampled ones
    num_computed: int = 0  # tokens whose KV the worker has computed
    table: list[int] = field(default_factory=list)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv: KVCacheManager
        self.block_size = 1
        self.requests: dict[str, ModelRequest] = {}
        self.finished_prompts: list[list[int]] = []
        # block id -> the whole token prefix ending with that block, recorded while the
        # block sat full of known tokens in some table; proves that hits return right content.
        self.content: dict[int, tuple[int, ...]] = {}
        self.next_id = 0
        self.sampled_token = 0  # what the model "samples" when a prefill/decode step completes

    @initialize(num_blocks=st.integers(2, 10), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.kv = KVCacheManager(num_blocks, block_size)
        self.block_size = block_size

    # -- helpers ----------------------------------------------------------------------------

    def snapshot(self) -> tuple[object, ...]:
        kv = self.kv
        return (
            [b.block_id for b in kv.pool.free_queue],
            [(b.ref_cnt, b.block_hash) for b in kv.pool.blocks],
            dict(kv.pool.cached_blocks),
            {rid: kv.block_ids(rid) for rid in self.requests},
        )

    def allocate(
        self, rid: str, req: ModelRequest, num_new: int, lookahead: int, hits: list[KVBlock]
    ) -> list[int] | None:
        """allocate_slots plus exact checks of its effect; updates the model on success."""
        kv, bs = self.kv, self.block_size
        covered = req.num_computed + num_new + lookahead
        num_fresh = max(0, blocks_for(covered, bs) - len(req.table) - len(hits))
        hits_in_queue = sum(1 for b in hits if b.ref_cnt == 0)
        free_before = kv.num_free_blocks
        before = self.snapshot()
        got = kv.allocate_slots(rid, req.tokens, num_new + lookahead, req.num_computed, hits)
        if got is None:
            event("allocation refused")
            assert num_fresh > free_before - hits_in_queue, "refused although blocks sufficed"
            assert self.snapshot() == before, "a refused allocation changed state"
            return None
        assert num_fresh <= free_before - hits_in_queue
        assert got[: len(hits)] == [b.block_id for b in hits]
        assert len(got) == len(hits) + num_fresh
        assert 0 not in got and len(set(got)) == len(got)
        assert kv.num_free_blocks == free_before - num_fresh - hits_in_queue, "evicted more than needed"
        fresh = got[len(hits) :]
        if any(before[1][i][1] is not None and kv.pool.blocks[i].block_hash is None for i in fresh):
            event("cached block evicted")
        for block_id in fresh:
            self.content.pop(block_id, None)  # fresh block: old content is overwritten
        held_before = len(req.table) + len(hits)
        req.table += got
        assert kv.block_ids(rid) == req.table
        # Exactly enough to cover: tables never shrink (earlier lookahead may exceed this step).
        assert len(req.table) == max(blocks_for(covered, bs), held_before)
        req.num_computed += num_new
        if req.num_computed == len(req.tokens):
            req.tokens.append(self.sampled_token)
        self.record_content(req)
        return got

    def record_content(self, req: ModelRequest) -> None:
        bs = self.block_size
        for index, block_id in enumerate(req.table[: len(req.tokens) // bs]):
            self.content[block_id] = tuple(req.tokens[: (index + 1) * bs])

    def admit(self, prompt: list[int], chunk: int) -> None:
        kv, bs = self.kv, self.block_size
        rid = f"r{self.next_id}"
        self.next_id += 1
        queries, hits_before = kv.prefix_cache_queries, kv.prefix_cache_hits
        hits, num_computed = kv.get_computed_blocks(rid, prompt)
        assert num_computed == len(hits) * bs
        assert num_computed <= max(0, len(prompt) - 1), "the last prompt token must run"
        assert kv.prefix_cache_queries == queries + len(prompt)
        assert kv.prefix_cache_hits == hits_before + num_computed
        ids = [b.block_id for b in hits]
        if hits:
            event("prefix hit")
        assert 0 not in ids and len(set(ids)) == len(ids)
        for index, block in enumerate(hits):
            expected = tuple(prompt[: (index + 1) * bs])
            assert self.content.get(block.block_id) == expected, "hit with wrong content"
        req = ModelRequest(tokens=list(prompt), num_computed=num_computed)
        num_new = min(chunk, len(prompt) - num_computed)
        if self.allocate(rid, req, num_new, 0, hits) is not None:
            self.requests[rid] = req
        else:
            assert kv.block_ids(rid) == []
            kv.free(rid)  # the scheduler forgets lookup state of a request it gives up on

    # -- rules ------------------------------------------------------------------------------

    @rule(
        prefix=st.integers(0, len(PREFIXES) - 1),
        cut=st.integers(0, 12),
        suffix=st.lists(VOCAB, max_size=6),
        chunk=st.integers(1, 16),
    )
    def admit_new(self, prefix: int, cut: int, suffix: list[int], chunk: int) -> None:
        prompt = PREFIXES[prefix][:cut] + suffix
        if prompt:
            self.admit(prompt, chunk)

    @precondition(lambda self: bool(self.finished_prompts))
    @rule(data=st.data(), chunk=st.integers(1, 16))
    def readmit_finished(self, data: st.DataObject, chunk: int) -> None:
        """The same conversation comes back (multi-turn): its whole history may hit."""
        self.admit(list(data.draw(st.sampled_from(self.finished_prompts))), chunk)

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data(), chunk=st.integers(1, 8), lookahead=st.integers(0, 2), token=VOCAB)
    def step(self, data: st.DataObject, chunk: int, lookahead: int, token: int) -> None:
        """One scheduler step for a running request: a prefill chunk or one decode token,
        optionally reserving slots ahead of tokens not sampled yet."""
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        req = self.requests[rid]
        self.sampled_token = token
        num_new = min(chunk, len(req.tokens) - req.num_computed)
        if self.allocate(rid, req, num_new, lookahead, []) is None:
            self.finish(rid)  # preempted: blocks go back, the prompt may be re-admitted

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.finish(data.draw(st.sampled_from(sorted(self.requests))))

    @rule()
    def free_unknown(self) -> None:
        before = self.snapshot()
        self.kv.free("no-such-request")
        assert self.snapshot() == before

    @rule()
    def reset_prefix_cache(self) -> None:
        idle = not self.requests
        before = self.snapshot()
        assert self.kv.reset_prefix_cache() is idle
        if idle:
            assert self.kv.pool.cached_blocks == {} and self.kv.pool.num_cached_free_blocks == 0
        else:
            assert self.snapshot() == before

    def finish(self, rid: str) -> None:
        kv = self.kv
        req = self.requests.pop(rid)
        blocks = [kv.pool.blocks[i] for i in req.table]
        expected_tail = [b.block_id for b in reversed(blocks) if b.ref_cnt == 1]
        queue_before = [b.block_id for b in kv.pool.free_queue]
        kv.free(rid)
        assert [b.block_id for b in kv.pool.free_queue] == queue_before + expected_tail
        assert kv.block_ids(rid) == []
        self.finished_prompts.append(req.tokens[: req.num_computed] or req.tokens)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def accounting_is_consistent(self) -> None:
        kv = self.kv
        kv.check_integrity()
        assert kv.num_requests == len(self.requests)
        held = {i for req in self.requests.values() for i in req.table}
        assert kv.usage == len(held) / kv.num_usable_blocks
        for rid, req in self.requests.items():
            assert kv.block_ids(rid) == req.table
            assert len(req.table) >= blocks_for(req.num_computed, self.block_size)


KVCacheMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVCacheProperty = KVCacheMachine.TestCase
