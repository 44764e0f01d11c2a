"""A simulated multi-worker stack for the central scheduler: no model, no sockets, real accounting.

Each SimWorker keeps, per block, which token's KV sits in each slot; a step writes the positions
it computes (as the model writes every token's KV before attending), then checks that every
position a sequence attends to reads the right token through its block table (prefix hits,
transferred blocks and migrations included).
A KV transfer copies slot contents from source to destination blocks. Tokens are a pure function
of (request id, output index), so a lost or repeated token changes the final outputs.
`check_integrity()` of the central scheduler runs after every event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from protocol.config import CacheSettings, SchedulerSettings
from protocol.messages import (
    AddRequest,
    FinishReason,
    KVCancel,
    KVLayout,
    KVPull,
    KVPullDone,
    RequestOutput,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerHello,
    WorkerRole,
)
from protocol.sampling import SamplingParams
from scheduler_svc.central import CentralScheduler
from scheduler_svc.effects import Effects
from tests.scheduler_harness import BS, VOCAB

LAYOUT = KVLayout(2, 1, 4, "float32", BS)


def token_for(rid: str, index: int) -> int:
    digest = hashlib.blake2b(f"{rid}:{index}".encode(), digest_size=4).digest()
    return 500 + int.from_bytes(digest, "little") % 400


@dataclass
class _Seq:
    tokens: list[int]
    num_prompt: int
    blocks: list[int]
    num_computed: int


@dataclass
class SimWorker:
    worker_id: str
    num_blocks: int
    seqs: dict[str, _Seq] = field(default_factory=dict)
    slots: dict[tuple[int, int], int] = field(default_factory=dict)  # (block, offset) -> token

    def run(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_request_ids:
            self.seqs.pop(rid, None)
        scheduled = []
        for s in plan.new_seqs:
            assert s.request_id not in self.seqs, f"{self.worker_id}: {s.request_id} sent as new but held"
            self.seqs[s.request_id] = _Seq(list(s.token_ids), s.num_prompt_tokens, list(s.block_ids),
                                           s.num_computed_tokens)
            scheduled.append((s.request_id, s.num_computed_tokens, s.num_scheduled_tokens))
        for c in plan.cached_seqs:
            seq = self.seqs[c.request_id]
            assert c.num_computed_tokens == seq.num_computed, f"{c.request_id} progress differs"
            seq.blocks.extend(c.new_block_ids)
            scheduled.append((c.request_id, c.num_computed_tokens, c.num_scheduled_tokens))
        for rid, computed, n in scheduled:  # the model writes every token's KV, then attends
            seq = self.seqs[rid]
            end = computed + n
            assert n > 0 and end <= len(seq.tokens) and end <= len(seq.blocks) * BS, f"{rid}: bad step"
            for pos in range(computed, end):
                self.slots[(seq.blocks[pos // BS], pos % BS)] = seq.tokens[pos]
        ids, tokens = [], []
        for rid, computed, n in scheduled:
            seq = self.seqs[rid]
            end = computed + n
            for pos in range(end):  # what attention reads
                got = self.slots.get((seq.blocks[pos // BS], pos % BS))
                assert got == seq.tokens[pos], (
                    f"{self.worker_id}: {rid} position {pos} reads {got}, expected {seq.tokens[pos]}")
            seq.num_computed = end
            if end == len(seq.tokens):
                token = token_for(rid, len(seq.tokens) - seq.num_prompt)
                seq.tokens.append(token)
                ids.append(rid)
                tokens.append(token)
        return StepResult(plan.step_id, self.worker_id, ids, np.array(tokens, dtype=np.int64))


class Cluster:
    def __init__(self, roles: list[WorkerRole], num_blocks: int = 64, budget: int = 64,
                 max_num_seqs: int = 16, max_model_len: int = 256, max_local_prefill_tokens: int = 0,
                 **settings: object) -> None:
        self.central = CentralScheduler(
            SchedulerSettings(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                              max_local_prefill_tokens=max_local_prefill_tokens, **settings),
            CacheSettings(block_size=BS))
        self.now = 1000.0
        self.sims: dict[str, SimWorker] = {}
        self.queued: dict[str, list[StepPlan]] = {}
        self.pulls: list[KVPull] = []
        self.cancelled: set[int] = set()
        self.shutdowns: list[str] = []
        self.outputs: dict[str, list[int]] = {}
        self.final: dict[str, RequestOutput] = {}
        self.pulled_blocks: list[int] = []  # blocks copied per completed transfer
        # A worker writes a pull's blocks only after every plan it got before the KVPull has run
        # (worker_process: KVPuller.pull(write_after=...)): the step ids each pull waits for.
        self.pull_after: dict[int, set[int]] = {}
        for i, role in enumerate(roles):
            self.join(f"w{i}", role, num_blocks, max_model_len)

    def hello(self, wid: str, role: WorkerRole, num_blocks: int = 64, max_model_len: int = 256,
              **overrides: object) -> WorkerHello:
        fields = dict(worker_id=wid, role=role, pid=1, host="h", device="cpu", model="m",
                      num_kv_blocks=num_blocks, block_size=BS, max_model_len=max_model_len,
                      vocab_size=VOCAB, kv_layout=LAYOUT, kv_address=f"ipc:///kv-{wid}",
                      transports=["zmq"], node_id="n")
        fields.update(overrides)
        return WorkerHello(**fields)

    def join(self, wid: str, role: WorkerRole, num_blocks: int = 64, max_model_len: int = 256,
             **overrides: object) -> str:
        slot, reason, effects = self.central.register(
            self.hello(wid, role, num_blocks, max_model_len, **overrides), wid.encode(), self.now)
        if slot is not None:
            self.sims[wid] = SimWorker(wid, num_blocks)
            self.queued[wid] = []
        self.apply(effects)
        return reason

    def slot(self, wid: str):
        return self.central.workers[wid]

    # ---------------------------------------------------------------- events

    def add(self, rid: str, prompt: list[int], **params: object) -> str:
        msg = AddRequest(rid, prompt, SamplingParams(**params), [], self.now)
        slot = self.central.add(msg, self.now)
        self.outputs[rid] = []
        effects = Effects()
        effects.plan(slot)
        self.apply(effects)
        return slot.worker_id

    def apply(self, effects: Effects) -> None:
        for slot, msg in effects.messages:
            if isinstance(msg, KVPull):
                self.pulls.append(msg)
                self.pull_after[msg.transfer_id] = {p.step_id for p in self.queued.get(slot.worker_id, [])}
            elif isinstance(msg, KVCancel):
                self.cancelled.add(msg.transfer_id)
            elif isinstance(msg, Shutdown):
                self.shutdowns.append(slot.worker_id)
        for slot in effects.kick.values():
            if slot.worker_id in self.queued:
                plans, more = self.central.plans(slot, True, self.now)
                self.queued[slot.worker_id] += plans
                if more.messages or more.kick or more.outputs:
                    self.apply(more)
        for out in effects.outputs:
            assert out.request_id not in self.final, f"{out.request_id} reported after finishing"
            self.outputs[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                self.final[out.request_id] = out
        self.central.check_integrity()

    def step(self, wid: str) -> bool:
        """Run the oldest plan queued at worker `wid`; False if none."""
        if not self.queued.get(wid):
            return False
        plan = self.queued[wid].pop(0)
        result = self.sims[wid].run(plan)
        self.now += 0.01
        if wid in self.central.workers:
            self.apply(self.central.on_result(self.slot(wid), result, self.now))
        return True

    def finish_pull(self, pull: KVPull, ok: bool = True, error: str = "") -> bool:
        """Complete a pull; False (nothing done) while the destination has not yet run the plans
        it got before the pull, since a real worker would not write before that."""
        dst_wid = self._dst_of(pull)
        if ok and self.pull_after.get(pull.transfer_id, set()) & {p.step_id for p in self.queued.get(dst_wid, [])}:
            return False
        self.pulls.remove(pull)
        if ok:
            src = self.sims[pull.src_worker_id]
            dst = self.sims[self._dst_of(pull)]
            for s, d in zip(pull.src_block_ids, pull.dst_block_ids):
                for off in range(BS):
                    if (s, off) in src.slots:
                        dst.slots[(d, off)] = src.slots[(s, off)]
            self.pulled_blocks.append(len(pull.dst_block_ids))
        self.now += 0.01
        done = KVPullDone(self._dst_of(pull), pull.transfer_id, ok, 64 * len(pull.dst_block_ids),
                          0.01, pull.transport, error)
        self.apply(self.central.on_pull_done(done, self.now))
        return True

    def _dst_of(self, pull: KVPull) -> str:
        return self.central.transfers[pull.transfer_id].dst.worker_id

    def kill(self, wid: str) -> None:
        self.queued.pop(wid, None)
        self.pulls = [p for p in self.pulls if p.src_worker_id != wid and
                      self.central.transfers.get(p.transfer_id) is not None and self._dst_of(p) != wid]
        self.apply(self.central.worker_lost(self.slot(wid), "was killed", self.now))
        self.sims.pop(wid)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.central.expire(self.now))

    def run(self, max_events: int = 2000) -> None:
        """Run steps and complete transfers until nothing is left to do."""
        for _ in range(max_events):
            progressed = False
            for wid in list(self.queued):
                progressed |= self.step(wid)
            for pull in list(self.pulls):
                if pull.transfer_id in self.central.transfers:
                    progressed |= self.finish_pull(pull)
                else:
                    self.pulls.remove(pull)
            if not progressed:
                if not self.central.requests:
                    return
                self.tick(0.5)
        raise AssertionError(f"requests did not finish: {sorted(self.central.requests)}")

    def expected(self, rid: str, n: int) -> list[int]:
        return [token_for(rid, i) for i in range(n)]


STOP, LENGTH, ABORT, ERROR = FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT, FinishReason.ERROR
P, D, M = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.MIXED
