"""The central scheduler over simulated workers, when things go wrong: failed, timed-out and
cancelled KV transfers, workers that die or hang mid-request, aborts mid-transfer, and random
fault sequences (test_central_scheduler.py has the paths without faults).

Every event runs check_integrity() of the whole stack (central_harness.Cluster.apply), and every
simulated step checks that each computed position reads the right token's KV through the block
table, so a wrong block plan or a leak fails the test where it happens.
"""

from __future__ import annotations

import os

import pytest

from protocol.messages import AddRequest, KVPullDone
from protocol.sampling import SamplingParams
from scheduler_svc.central import NoWorkerReady
from tests.central_harness import ABORT, ERROR, LENGTH, Cluster, D, M, P
from tests.scheduler_harness import toks


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
