"""Scheduler lifecycle, step by step: stops, rejections at intake, aborts and failed steps.

Driven through tests/scheduler_harness.py with exact plans; check_integrity() after every step.
"""

from __future__ import annotations

import numpy as np
import pytest

from protocol.messages import AddRequest, FinishReason, StepResult
from protocol.sampling import SamplingParams
from scheduler_svc.worker_scheduler import QueueFull, RequestRejected
from tests.scheduler_harness import (
    ABORT, ERROR, LENGTH, STOP, VOCAB, Harness, cached, news, toks,
)

# ---------------------------------------------------------------------------- stops


@pytest.mark.parametrize(
    "params, script, expected_output, reason, stop_id",
    [
        ({"eos": [2]}, [5, 2, 9], [5, 2], STOP, None),
        ({"eos": [2], "ignore_eos": True, "max_tokens": 3}, [2, 2, 2, 2], [2, 2, 2], LENGTH, None),
        ({"stop_token_ids": [7]}, [5, 7, 9], [5, 7], STOP, 7),
        ({"eos": [2], "min_tokens": 3}, [2, 2, 2, 2], [2, 2, 2], STOP, None),
        ({"max_tokens": 2}, [5, 6, 7], [5, 6], LENGTH, None),
    ],
    ids=["eos", "ignore_eos", "stop_token_id", "min_tokens", "max_tokens"],
)
def test_stops(
    params: dict, script: list[int], expected_output: list[int], reason: FinishReason, stop_id: int | None
) -> None:
    h = Harness(script={"a": script})
    h.add("a", toks(100, 5), **params)
    h.run_until_idle()
    assert h.outputs["a"] == expected_output
    assert (h.final["a"].finish_reason, h.final["a"].stop_token_id) == (reason, stop_id)
    assert h.schedule().finished_request_ids == ["a"] and h.kv.usage == 0


def test_context_length_ends_the_request() -> None:
    h = Harness(max_model_len=12)
    h.add("a", toks(100, 10), max_tokens=100)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 10, [1, 2, 3])]
    plan, _ = h.step()
    assert cached(plan) == [("a", 10, 1, [])]
    assert h.final["a"].finish_reason == LENGTH and len(h.outputs["a"]) == 2
    assert not h.sched.has_unfinished


def test_planning_ahead_of_results_stops_at_the_context() -> None:
    """Async scheduling: plans go out before earlier results return; positions stay in context."""
    h = Harness(max_model_len=12)
    h.add("a", toks(100, 10), max_tokens=100)
    plans = [h.schedule() for _ in range(4)]
    assert news(plans[0]) == [("a", 0, 10, [1, 2, 3])]
    # The two samples in flight will fill the context: nothing is planned past them.
    assert [cached(p) for p in plans[1:]] == [[("a", 10, 1, [])], [], []]
    results = [h.execute(p) for p in plans]
    assert [r.request_ids for r in results] == [["a"], ["a"], [], []]
    for result in results:
        h.update(result)
    assert h.outputs["a"] == h.fed["a"] and len(h.fed["a"]) == 2
    assert h.final["a"].finish_reason == LENGTH and not h.sched.has_unfinished


def test_planning_ahead_of_results_stops_at_max_tokens() -> None:
    """A request whose samples in flight reach max_tokens is not scheduled again."""
    h = Harness()
    h.add("a", toks(100, 5), max_tokens=2)
    h.add("b", toks(200, 5), max_tokens=8)
    plans = [h.schedule() for _ in range(3)]
    assert [s[0] for s in news(plans[0])] == ["a", "b"]
    assert [s[:3] for s in cached(plans[1])] == [("a", 5, 1), ("b", 5, 1)]
    assert [s[:3] for s in cached(plans[2])] == [("b", 6, 1)]  # a's 2 samples are in flight
    for plan in plans:
        h.update(h.execute(plan))
    assert len(h.outputs["a"]) == 2 and h.final["a"].finish_reason == LENGTH
    assert h.outputs["a"] == h.fed["a"]  # nothing computed past its end
    assert len(h.outputs["b"]) == 3 and h.sched.has_unfinished


def test_sample_of_a_preempted_and_readmitted_request_from_before_is_dropped() -> None:
    """Two plans ahead: b is preempted and resumed before its old sample comes back."""
    h = Harness(num_blocks=5)
    h.add("a", toks(1, 6), max_tokens=9)
    h.add("b", toks(11, 6), max_tokens=9)
    h.step()
    h.step()  # both hold 8 tokens
    plan_n = h.schedule()
    result_n = h.execute(plan_n)  # b samples its 3rd output; the scheduler has not seen it
    plan_n1 = h.schedule()
    assert plan_n1.finished_request_ids == ["b"] and cached(plan_n1) == [("a", 8, 1, [4])]
    result_n1 = h.execute(plan_n1)
    h.collect(h.sched.abort(["a"]))
    h.sched.check_integrity()
    plan_n2 = h.schedule()
    assert news(plan_n2) == [("b", 4, 4, [3, 4])]  # resumed from 2 outputs, block 3 cached
    result_n2 = h.execute(plan_n2)
    for result in (result_n, result_n1, result_n2):
        h.update(result)
    # The worker's sequence holds the resumed sample, and so must the scheduler's outputs.
    assert h.outputs["b"] == h.worker.seqs["b"].tokens[6:] == [h.fed["b"][i] for i in (0, 1, 3)]
    assert h.sched.requests["b"].num_tokens == 9


# ---------------------------------------------------------------------------- intake


def test_rejections_name_the_cause() -> None:
    h = Harness(max_model_len=16)
    ok = SamplingParams()
    for n in (16, 17):  # a prompt that fills the context leaves no room for an output
        with pytest.raises(RequestRejected, match=f"has {n} tokens but the model's context is 16") as exc:
            h.sched.add_request(AddRequest("long", toks(1, n), ok, [], 0.0))
        assert exc.value.param == "prompt"
    h.sched.add_request(AddRequest("fits", toks(1, 15), ok, [], 0.0))  # leaves room for one token
    cases = [
        (AddRequest("empty", [], ok, [], 0.0), "prompt", "empty"),
        (AddRequest("oov", [1, VOCAB], ok, [], 0.0), "prompt", r"\[0, 1000\)"),
        (AddRequest("neg", [-1, 2], ok, [], 0.0), "prompt", r"\[0, 1000\)"),
        (AddRequest("fits", [1, 2], ok, [], 0.0), "request_id", "already in use"),
        (AddRequest("t", [1], SamplingParams(temperature=3.0), [], 0.0), "temperature", "temperature"),
        (AddRequest("s", [1], SamplingParams(stop_token_ids=[VOCAB]), [], 0.0), "stop_token_ids", "999"),
        (AddRequest("m", [1], SamplingParams(max_tokens=2, min_tokens=3), [], 0.0), "min_tokens", "<="),
    ]
    for msg, param, text in cases:
        with pytest.raises(RequestRejected, match=text) as exc:
            h.sched.add_request(msg)
        assert exc.value.param == param, msg.request_id
        h.sched.check_integrity()
    assert list(h.sched.requests) == ["fits"] and len(h.sched.waiting) == 1


def test_duplicate_id_of_a_running_request_is_rejected() -> None:
    h = Harness()
    h.add("a", toks(1, 4))
    h.step()
    with pytest.raises(RequestRejected) as exc:
        h.add("a", toks(1, 4))
    assert exc.value.param == "request_id"


def test_queue_full_past_max_waiting_requests() -> None:
    """The bound counts queued requests that no free batch slot can take (2 slots here)."""
    h = Harness(max_waiting=1, max_num_seqs=2)
    for rid, start in (("a", 1), ("b", 11), ("c", 21)):  # a and b have slots: only c waits
        h.add(rid, toks(start, 4))
    with pytest.raises(QueueFull, match="1 requests are waiting for a batch slot"):
        h.add("d", toks(31, 4))
    assert "d" not in h.sched.requests
    h.step()  # a and b start running; c still has no slot
    with pytest.raises(QueueFull):
        h.add("d", toks(31, 4))
    h.sched.abort(["a"], FinishReason.ABORT)  # a slot frees: c can take it, d may queue
    h.add("d", toks(31, 4))
    assert [r.request_id for r in h.sched.waiting] == ["c", "d"]


# ---------------------------------------------------------------------------- abort and failure


def test_abort_waiting_and_running_requests() -> None:
    h = Harness(max_num_seqs=1)
    h.add("a", toks(1, 6), max_tokens=10)
    h.add("b", toks(11, 6), max_tokens=10)
    h.step()
    assert h.kv.block_ids("a") == [1, 2] and h.kv.usage == 2 / 63

    outs = h.sched.abort(["b", "nobody"])
    h.sched.check_integrity()
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [("b", [], ABORT)]
    plan, _ = h.step()
    assert plan.finished_request_ids == [] and cached(plan) == [("a", 6, 1, [])]

    outs = h.sched.abort(["a"])
    h.sched.check_integrity()
    assert [(o.request_id, o.finish_reason, o.num_prompt_tokens) for o in outs] == [("a", ABORT, 6)]
    assert h.kv.usage == 0 and not h.sched.has_unfinished
    plan = h.schedule()
    assert plan.finished_request_ids == ["a"] and news(plan) == [] and cached(plan) == []
    assert h.sched.abort(["a"]) == []
    assert h.execute(plan).request_ids == [] and h.worker.seqs == {}


def test_abort_with_a_stop_reason() -> None:
    """The detokenizer ends a request on a stop string through the same path."""
    h = Harness()
    h.add("a", toks(1, 4))
    h.step()
    outs = h.sched.abort(["a"], STOP)
    h.sched.check_integrity()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", STOP)]


def test_results_of_a_request_aborted_while_its_step_ran_are_ignored() -> None:
    h = Harness()
    h.add("a", toks(1, 4), max_tokens=5)
    h.add("b", toks(11, 4), max_tokens=5)
    h.step()
    plan = h.schedule()
    result = h.execute(plan)
    assert result.request_ids == ["a", "b"]
    h.collect(h.sched.abort(["a"]))
    h.sched.check_integrity()
    outs = h.update(result)
    assert [o.request_id for o in outs] == ["b"]
    assert h.final["a"].finish_reason == ABORT and h.outputs["a"] == h.fed["a"][:1]
    assert h.outputs["b"] == h.fed["b"]
    plan = h.schedule()
    assert plan.finished_request_ids == ["a"] and cached(plan) == [("b", 5, 1, [])]


def test_results_for_unknown_requests_are_ignored() -> None:
    h = Harness()
    h.add("a", toks(1, 4))
    h.schedule()
    result = StepResult(1, "fake", ["ghost", "a"], np.array([5, 6], dtype=np.int64))
    outs = h.update(result)
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", [6])]


def test_fail_step_ends_the_plans_requests_with_the_error() -> None:
    h = Harness(max_num_seqs=2)
    h.add("a", toks(1, 4))
    h.add("b", toks(11, 4))
    h.add("c", toks(21, 4), max_tokens=1)
    plan = h.schedule()
    assert news(plan) == [("a", 0, 4, [1]), ("b", 0, 4, [2])]
    outs = h.sched.fail_step(plan, "worker 0: CUDA out of memory")
    h.sched.check_integrity()
    assert [(o.request_id, o.new_token_ids, o.finish_reason, o.error) for o in outs] == [
        ("a", [], ERROR, "worker 0: CUDA out of memory"),
        ("b", [], ERROR, "worker 0: CUDA out of memory"),
    ]
    assert list(h.sched.requests) == ["c"] and h.sched.fail_step(plan, "again") == []
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a", "b"] and news(plan) == [("c", 0, 4, [3])]
    assert h.final["c"].finish_reason == LENGTH
    assert h.schedule().finished_request_ids == ["c"] and h.kv.usage == 0


def test_a_row_the_worker_reports_as_failed_ends_only_that_request_with_its_error() -> None:
    """A grammar that fails in the worker: that request ends with the error (never empty +
    "stop"), its row's token is dropped, and the rest of the step is taken as usual."""
    h = Harness()
    h.add("a", toks(1, 4))
    h.add("b", toks(11, 4))
    plan = h.schedule()
    result = h.worker.run(plan, lambda rid, i: {"a": 7, "b": 8}[rid])
    result.request_errors = {"a": "the grammar matcher failed: boom"}
    outs = h.update(result)
    assert [(o.request_id, o.new_token_ids, o.finish_reason, o.error) for o in outs] == [
        ("a", [], ERROR, "the grammar matcher failed: boom"), ("b", [8], None, "")]
    assert list(h.sched.requests) == ["b"]
    assert h.schedule().finished_request_ids == ["a"]  # the worker forgets it


def test_failed_step_leaves_no_prefix_cache_hit_on_unwritten_blocks() -> None:
    h = Harness()
    h.add("a", toks(1, 9))
    plan = h.schedule()
    assert news(plan) == [("a", 0, 9, [1, 2, 3])]
    h.sched.fail_step(plan, "worker died")
    h.sched.check_integrity()
    h.add("b", toks(1, 9))  # same prompt: its first two blocks were hashed but never written
    plan, _ = h.step()
    assert [(s.request_id, s.num_computed_tokens) for s in plan.new_seqs] == [("b", 0)]
