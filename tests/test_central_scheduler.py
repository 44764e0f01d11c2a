"""The central scheduler over simulated workers: disaggregated handoffs, KV-aware routing,
migration on death and failed transfers, draining, registration checks.

Every event runs check_integrity() of the whole stack (central_harness.Cluster.apply), and every
simulated step checks that each computed position reads the right token's KV through the block
table, so a wrong block plan or a leak fails the test where it happens.
"""

from __future__ import annotations

import os

import pytest

from protocol.messages import AddRequest, KVLayout, KVPullDone
from protocol.sampling import SamplingParams
from scheduler_svc.central import NoWorkerReady
from scheduler_svc.worker_scheduler import RequestRejected
from tests.central_harness import ABORT, ERROR, LENGTH, BS, Cluster, D, M, P
from tests.scheduler_harness import toks


def test_prefill_then_transfer_then_decode_elsewhere() -> None:
    c = Cluster([P, D])
    assert c.add("a", toks(1, 10), max_tokens=5) == "w0"
    c.step("w0")  # the whole prompt: 10 tokens in 3 blocks, first token sampled on the prefill worker
    assert c.outputs["a"] == c.expected("a", 1)  # streamed before any transfer
    [pull] = c.pulls
    assert (pull.src_worker_id, pull.request_id, pull.transport) == ("w0", "a", "zmq")
    assert pull.src_block_ids == c.slot("w0").kv.block_ids("a")  # 10 KV tokens = 3 blocks, all sent
    assert len(pull.dst_block_ids) == 3 and pull.dst_block_ids == c.slot("w1").kv.block_ids("a")[:3]
    assert c.slot("w0").transfers_out == 1 and c.slot("w1").transfers_in == 1
    c.finish_pull(pull)
    plan = c.queued["w1"][0]  # (a second, pipelined plan decodes the next token)
    [seq] = plan.new_seqs  # the decode worker learns the request with its KV in place
    assert (seq.request_id, seq.num_computed_tokens, seq.num_scheduled_tokens) == ("a", 10, 1)
    assert c.slot("w0").kv.usage == 0 and c.slot("w0").kv.num_requests == 0  # prefill side freed...
    assert c.slot("w0").kv.count_cached_prefix(c.central._hashes(toks(1, 10))) == 2  # ...into its cache
    c.run()
    assert c.outputs["a"] == c.expected("a", 5) and c.final["a"].finish_reason == LENGTH
    assert c.slot("w1").kv.usage == 0
    assert c.central.finished_phases[-1].disaggregated and c.central.finished_phases[-1].transfer_seconds > 0


def test_a_chunked_prefill_sends_each_chunk_s_blocks_while_the_next_chunk_runs() -> None:
    c = Cluster([P, D], budget=8)  # 8-token chunks: two blocks each
    c.add("a", toks(1, 20), max_tokens=3)  # 19 KV tokens: 5 blocks
    c.step("w0")
    [first] = c.pulls  # chunk 1 is written: its two blocks go while chunk 2 runs
    assert len(first.src_block_ids) == 2 and first.src_block_ids == c.slot("w0").kv.block_ids("a")[:2]
    assert c.outputs["a"] == [] and "a" in c.slot("w1").scheduler.incoming
    c.finish_pull(first)
    assert "a" in c.slot("w1").scheduler.incoming  # not active: more parts to come
    c.step("w0")
    [second] = c.pulls
    assert second.src_block_ids == c.slot("w0").kv.block_ids("a")[2:4]
    c.step("w0")  # the last chunk samples the first token; only the tail block is left to send
    assert c.outputs["a"] == c.expected("a", 1)
    assert [len(p.src_block_ids) for p in c.pulls] == [2, 1]
    assert all(not p.cached_seqs for p in c.queued["w0"])  # no decode on the prefill worker
    c.run()
    assert c.outputs["a"] == c.expected("a", 3) and c.pulled_blocks == [2, 2, 1]
    assert c.central.finished_phases[-1].disaggregated


def test_an_early_handoff_ends_when_the_prefill_worker_preempts_the_request() -> None:
    c = Cluster([P], budget=8, num_blocks=12, max_inflight_steps=1)  # 11 usable blocks
    c.join("w1", D, num_blocks=64)
    c.add("a", toks(1, 20), max_tokens=3)  # 6 blocks once sampled, held until its KV has moved
    c.add("b", toks(100, 28), max_tokens=3)  # starts in a's last chunk, then runs out of blocks
    early_parts: set[int] = set()
    for _ in range(10):  # no transfer completes meanwhile: a keeps its blocks
        c.step("w0")
        h = c.central.handoffs.get("b")
        if h is not None:
            early_parts |= h.parts
        if c.central.requests["b"].num_preemptions:
            break
    assert early_parts and c.central.requests["b"].num_preemptions == 1
    assert early_parts <= c.cancelled  # the blocks it was reading are free on the prefill side
    assert "b" not in c.central.handoffs and "b" not in c.slot("w1").scheduler.incoming
    c.run()
    for rid in "ab":
        assert c.outputs[rid] == c.expected(rid, 3)


def test_a_request_that_ends_at_its_first_token_ends_its_early_handoff() -> None:
    c = Cluster([P, D], budget=8)
    c.add("a", toks(1, 20), max_tokens=1)
    c.run()
    assert c.outputs["a"] == c.expected("a", 1) and c.final["a"].finish_reason == LENGTH
    assert not c.central.handoffs and c.slot("w1").kv.num_requests == 0


def test_short_prompts_run_where_they_decode() -> None:
    c = Cluster([P, D], max_local_prefill_tokens=16)
    assert c.add("short", toks(1, 10), max_tokens=4) == "w1"
    assert c.add("long", toks(100, 30), max_tokens=4) == "w0"
    c.run()
    assert c.pulled_blocks == [8]  # only the long one moved: 29 KV tokens in 8 blocks
    assert c.outputs["short"] == c.expected("short", 4) and c.outputs["long"] == c.expected("long", 4)


def test_shared_prefix_goes_to_the_decode_worker_that_caches_it_and_crosses_once() -> None:
    c = Cluster([P, D, D])
    system = toks(1, 24)  # 6 full blocks shared
    c.add("a", system + [900, 901], max_tokens=3)
    c.run()
    first_target = next(w for w in ("w1", "w2") if c.slot(w).kv.count_cached_prefix(c.central._hashes(system)))
    c.add("b", system + [902, 903, 904], max_tokens=3)
    c.step("w0")
    [pull] = c.pulls
    assert c._dst_of(pull) == first_target
    assert len(pull.dst_block_ids) == 1  # 27 KV tokens: blocks 0-5 cached there, only block 6 copied
    assert pull.src_block_ids == c.slot("w0").kv.block_ids("b")[6:7]
    c.run()
    assert c.pulled_blocks == [7, 1]
    assert c.outputs["b"] == c.expected("b", 3)


def test_blocks_being_copied_in_are_not_prefix_hits_until_they_arrive() -> None:
    c = Cluster([P, D])
    prompt = toks(1, 17)
    c.add("a", prompt, max_tokens=3)
    c.step("w0")
    hashes = c.central._hashes(prompt)
    assert c.slot("w1").kv.count_cached_prefix(hashes) == 0  # reserved, KV not there yet
    c.finish_pull(c.pulls[0])
    assert c.slot("w1").kv.count_cached_prefix(hashes) == 4


def test_a_failed_transfer_releases_both_sides_and_the_request_is_recomputed() -> None:
    c = Cluster([P, D])
    c.add("a", toks(1, 10), max_tokens=4)
    c.step("w0")
    c.finish_pull(c.pulls[0], ok=False, error="peer went away")
    assert c.slot("w1").kv.num_requests == 0 and "a" not in c.slot("w1").scheduler.requests
    assert c.central.num_migrations == 1
    c.run()
    assert c.outputs["a"] == c.expected("a", 4)  # no token lost or repeated


def test_a_transfer_that_times_out_is_cancelled_and_released() -> None:
    c = Cluster([P, D], kv_transfer_timeout=2.0)
    c.add("a", toks(1, 10), max_tokens=4)
    c.step("w0")
    [pull] = c.pulls
    c.tick(1.0)
    assert pull.transfer_id in c.central.transfers
    c.tick(2.5)
    assert pull.transfer_id in c.cancelled and not c.central.transfers
    assert c.slot("w1").kv.num_requests == 0 and c.slot("w1").scheduler.is_empty
    assert c.slot("w0").scheduler.requests["a"].num_migrations == 1  # recomputed on the prefill side
    c.pulls.clear()  # the stopped destination never answers
    c.run()
    assert c.outputs["a"] == c.expected("a", 4)


def test_late_done_of_a_cancelled_transfer_is_ignored() -> None:
    c = Cluster([P, D], kv_transfer_timeout=1.0)
    c.add("a", toks(1, 10), max_tokens=2)
    c.step("w0")
    [pull] = c.pulls
    c.tick(3.0)
    c.apply(c.central.on_pull_done(KVPullDone("w1", pull.transfer_id, True, 64, 0.1, "zmq"), c.now))
    c.pulls.clear()
    c.run()
    assert c.outputs["a"] == c.expected("a", 2)


def test_cuda_ipc_failure_retries_the_same_blocks_over_zmq() -> None:
    c = Cluster([], num_blocks=64)
    c.join("p", P, transports=["zmq", "cuda-ipc"])
    c.join("d", D, transports=["zmq", "cuda-ipc"])
    c.add("a", toks(1, 10), max_tokens=3)
    c.step("p")
    [ipc] = c.pulls
    assert ipc.transport == "cuda-ipc"
    c.finish_pull(ipc, ok=False, error="cannot open handle")
    [retry] = c.pulls
    assert retry.transport == "zmq" and retry.dst_block_ids == ipc.dst_block_ids
    c.run()
    assert c.outputs["a"] == c.expected("a", 3)


@pytest.mark.parametrize("when", ["decoding", "in transfer"])
def test_decode_worker_death_moves_its_requests_without_gaps(when: str) -> None:
    c = Cluster([P, D, D])
    for i in range(4):
        c.add(f"r{i}", toks(10 * i + 1, 9), max_tokens=6)
    c.step("w0")
    if when == "decoding":
        for pull in list(c.pulls):
            c.finish_pull(pull)
        for _ in range(2):
            c.step("w1"), c.step("w2")
    victim = "w1"
    c.kill(victim)
    assert victim not in c.central.workers and c.central.departed[-1].state == "dead"
    c.run()
    for i in range(4):
        assert c.outputs[f"r{i}"] == c.expected(f"r{i}", 6), f"r{i}"
        assert c.final[f"r{i}"].finish_reason == LENGTH
    assert all(s.kv.usage == 0 for s in c.central.workers.values())


def test_prefill_worker_death_mid_prefill_moves_to_the_other_prefill_worker() -> None:
    c = Cluster([P, P, D], budget=8)
    c.add("a", toks(1, 30), max_tokens=3)
    owner = next(w for w in ("w0", "w1") if "a" in c.slot(w).scheduler.requests)
    c.step(owner)
    c.kill(owner)
    c.run()
    assert c.outputs["a"] == c.expected("a", 3)


def test_when_no_worker_is_left_requests_fail_clearly() -> None:
    c = Cluster([M])
    c.add("a", toks(1, 5), max_tokens=8)
    c.step("w0")
    c.kill("w0")
    assert c.final["a"].finish_reason == ERROR and "w0 was killed" in c.final["a"].error
    assert "no worker can take it" in c.final["a"].error
    with pytest.raises(NoWorkerReady):
        c.central.add(AddRequest("b", [1], SamplingParams(), [], c.now), c.now)


def test_without_decode_workers_a_prefill_worker_serves_whole_requests() -> None:
    c = Cluster([P])
    c.add("a", toks(1, 12), max_tokens=3)
    c.run()
    assert c.outputs["a"] == c.expected("a", 3) and not c.pulled_blocks


def test_decode_worker_leaving_before_handoff_sends_the_request_back_to_prefill() -> None:
    c = Cluster([P, D])
    c.add("a", toks(1, 10), max_tokens=4)
    c.kill("w1")
    c.run()
    assert c.outputs["a"] == c.expected("a", 4)


def test_draining_worker_finishes_running_requests_moves_waiting_ones_then_shuts_down() -> None:
    c = Cluster([M, M], max_num_seqs=1)
    c.add("a", toks(1, 5), max_tokens=4)
    c.add("b", toks(50, 5), max_tokens=4)  # the other worker
    c.add("c", toks(90, 5), max_tokens=4)  # waits behind one of them
    holder = next(w for w in ("w0", "w1") if "c" in c.slot(w).scheduler.requests)
    other = "w1" if holder == "w0" else "w0"
    c.step(holder)
    c.apply(c.central.drain(c.slot(holder), c.now))
    assert "c" in c.slot(other).scheduler.requests  # moved off before it started
    assert c.slot(holder).state == "draining"
    c.run()
    assert c.shutdowns == [holder] and holder not in c.central.workers
    assert c.central.departed[-1].state == "drained"
    for rid in "abc":
        assert c.outputs[rid] == c.expected(rid, 4)


def test_drain_timeout_moves_what_is_left() -> None:
    c = Cluster([M, M], drain_timeout=1.0)
    c.add("a", toks(1, 5), max_tokens=50)
    holder = next(w for w in ("w0", "w1") if "a" in c.slot(w).scheduler.requests)
    c.step(holder)
    c.apply(c.central.drain(c.slot(holder), c.now))
    c.tick(2.0)
    assert "a" not in c.slot(holder).scheduler.requests  # moved at the deadline
    c.run()
    assert holder not in c.central.workers and c.shutdowns == [holder]
    assert c.outputs["a"] == c.expected("a", 50)


def test_abort_mid_transfer_cancels_it_and_frees_both_sides() -> None:
    c = Cluster([P, D])
    c.add("a", toks(1, 10), max_tokens=4)
    c.step("w0")
    [pull] = c.pulls
    c.apply(c.central.abort(["a"], ABORT, c.now))
    assert pull.transfer_id in c.cancelled and c.final["a"].finish_reason == ABORT
    assert c.slot("w0").kv.num_requests == 0 and c.slot("w1").kv.num_requests == 0
    assert c.central.finished_transfers == []  # the client went away: no transfer failed


def test_a_destination_that_missed_a_transfer_gets_no_new_work_until_it_is_heard_from() -> None:
    c = Cluster([P, D, D], kv_transfer_timeout=2.0)
    c.add("a", toks(1, 10), max_tokens=4)
    c.step("w0")
    [pull] = c.pulls
    silent = c._dst_of(pull)
    other = ({"w1", "w2"} - {silent}).pop()
    c.tick(3.5)  # past the deadline (timeout + 1 s): the destination never answered
    assert pull.transfer_id in c.cancelled
    [record] = c.central.finished_transfers
    assert (record.ok, record.num_bytes) == (False, 0)  # counted as a failed transfer
    assert c.slot(silent).missed_transfer and not c.slot(silent).is_routable
    assert c.slot(silent).state == "ready"  # not declared dead: only liveness does that
    c.pulls.clear()
    c.add("b", toks(50, 10), max_tokens=3)
    c.run()  # "a" is recomputed and, like "b", handed to the worker that still answers
    assert c.outputs["a"] == c.expected("a", 4) and c.outputs["b"] == c.expected("b", 3)
    assert (c.slot(other).transfers_done, c.slot(silent).transfers_done) == (2, 0)
    c.slot(silent).heard_from(c.now)  # any message (a heartbeat) makes it routable again
    assert c.slot(silent).is_routable


def test_transfers_cut_by_their_destination_s_death_count_as_failed() -> None:
    c = Cluster([P, D, D])
    c.add("a", toks(1, 10), max_tokens=4)
    c.step("w0")
    [pull] = c.pulls
    c.kill(c._dst_of(pull))
    assert [r.ok for r in c.central.finished_transfers] == [False]
    c.run()
    assert c.outputs["a"] == c.expected("a", 4)


def test_workers_that_do_not_fit_the_stack_are_refused() -> None:
    c = Cluster([M])
    assert "model" in c.join("x", D, model="other")
    assert "block size" in c.join("y", D, block_size=BS * 2)
    assert "KV layout" in c.join("z", D, kv_layout=KVLayout(3, 1, 4, "float32", BS))
    assert set(c.central.workers) == {"w0"}
    assert c.join("ok", D) == ""


def test_step_ids_are_unique_across_workers() -> None:
    c = Cluster([M, M])
    c.add("a", toks(1, 5), max_tokens=3)
    c.add("b", toks(20, 5), max_tokens=3)
    ids = [p.step_id for plans in c.queued.values() for p in plans]
    assert len(ids) == len(set(ids)) == 4  # two pipelined plans per worker


def test_a_reregistered_worker_starts_clean_and_its_old_requests_move() -> None:
    c = Cluster([M, M])
    c.add("a", toks(1, 5), max_tokens=6)
    holder = next(w for w in ("w0", "w1") if "a" in c.slot(w).scheduler.requests)
    c.step(holder)
    c.join(holder, M)  # the same id says Hello again: it lost its state
    assert c.slot(holder).kv.num_requests == 0
    c.sims[holder].seqs.clear()
    c.queued[holder] = []
    c.run()
    assert c.outputs["a"] == c.expected("a", 6)


@pytest.mark.parametrize("seed", range(int(os.environ.get("CLUSTER_SEEDS", "40"))))
def test_random_faults_never_break_the_accounting_or_a_stream(seed: int) -> None:
    """Random arrivals, steps, finished/failed/slow transfers, aborts, drains, deaths and joins on
    a small stack: integrity holds after every event (Cluster.apply), every step reads the right
    KV, and every request either ends with exactly its tokens or with an error / abort."""
    import random

    rng = random.Random(seed)
    c = Cluster([P, P, D, D, M], budget=rng.choice([8, 16, 64]), num_blocks=rng.choice([24, 40, 64]),
                max_num_seqs=rng.choice([2, 4, 16]), max_inflight_steps=rng.choice([1, 2]),
                max_local_prefill_tokens=rng.choice([0, 8, 32]), kv_transfer_timeout=1.0, drain_timeout=2.0)
    want: dict[str, int] = {}
    joined = 0
    for event in range(400):
        roll = rng.random()
        live = list(c.central.workers)
        if roll < 0.15 and len(want) < 30:
            rid = f"r{event}"
            want[rid] = rng.randint(1, 12)
            try:
                c.add(rid, toks(rng.randint(1, 300), rng.randint(1, 40)), max_tokens=want[rid])
            except Exception:  # no worker ready: the service answers 503
                del want[rid]
        elif roll < 0.55 and live:
            c.step(rng.choice(live))
        elif roll < 0.75 and c.pulls:
            pull = rng.choice(c.pulls)
            if pull.transfer_id in c.central.transfers:
                c.finish_pull(pull, ok=rng.random() < 0.85, error="injected")
            else:
                c.pulls.remove(pull)
        elif roll < 0.80:
            c.tick(rng.choice([0.2, 1.5]))
        elif roll < 0.84 and c.central.requests:
            rid = rng.choice(sorted(c.central.requests))
            c.apply(c.central.abort([rid], ABORT, c.now))
        elif roll < 0.87 and len(live) > 1:
            c.apply(c.central.drain(c.slot(rng.choice(live)), c.now))
        elif roll < 0.90 and len(live) > 1:
            c.kill(rng.choice(live))
        elif roll < 0.93 and len(live) < 6:
            joined += 1
            c.join(f"n{joined}", rng.choice([P, D, M]))
    if not c.central.workers:
        c.join("last", M)
    c.run(max_events=5000)
    for rid, n in want.items():
        final = c.final[rid]
        if final.finish_reason == LENGTH:
            assert c.outputs[rid] == c.expected(rid, n), rid
        else:
            assert final.finish_reason in (ABORT, ERROR), rid
            assert c.outputs[rid] == c.expected(rid, len(c.outputs[rid])), rid  # a prefix, no gap
    assert not c.central.transfers and not c.central.handoffs
    assert all(s.kv.num_requests == 0 for s in c.central.workers.values())


def test_a_request_goes_to_a_worker_whose_context_holds_it() -> None:
    c = Cluster([])
    c.join("small", M, max_model_len=32)
    c.join("big", M, max_model_len=256)
    assert c.add("long", toks(1, 40), max_tokens=3) == "big"
    with pytest.raises(RequestRejected, match="largest context of a ready worker is 256"):
        c.central.add(AddRequest("huge", toks(1, 300), SamplingParams(), [], c.now), c.now)
    c.run()
    assert c.outputs["long"] == c.expected("long", 3)
