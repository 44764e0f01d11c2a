"""The central scheduler over simulated workers: disaggregated handoffs, KV-aware routing,
draining, registration checks (test_central_faults.py: failed transfers, deaths, aborts).

Every event runs check_integrity() of the whole stack (central_harness.Cluster.apply), and every
simulated step checks that each computed position reads the right token's KV through the block
table, so a wrong block plan or a leak fails the test where it happens.
"""

from __future__ import annotations

import pytest

from protocol.messages import AddRequest, KVLayout
from protocol.sampling import SamplingParams
from scheduler_svc.worker_scheduler import RequestRejected
from tests.central_harness import LENGTH, BS, Cluster, D, M, P
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


def test_a_request_goes_to_a_worker_whose_context_holds_it() -> None:
    c = Cluster([])
    c.join("small", M, max_model_len=32)
    c.join("big", M, max_model_len=256)
    assert c.add("long", toks(1, 40), max_tokens=3) == "big"
    with pytest.raises(RequestRejected, match="largest context of a ready worker is 256"):
        c.central.add(AddRequest("huge", toks(1, 300), SamplingParams(), [], c.now), c.now)
    c.run()
    assert c.outputs["long"] == c.expected("long", 3)


def test_work_totals_count_every_step_s_computed_and_generated_tokens() -> None:
    """What the throughput log reports: a 10-token prompt and 5 output tokens on one worker are
    one prefill step (10 tokens computed, 1 generated) and 4 decode steps (1 and 1 each); the
    plan that only tells the worker to drop the finished request is not a step."""
    c = Cluster([M])
    c.add("a", toks(1, 10), max_tokens=5)
    c.run()
    assert c.outputs["a"] == c.expected("a", 5)
    work = c.central.work
    assert (work.steps, work.computed_tokens, work.generated_tokens) == (5, 14, 5)
