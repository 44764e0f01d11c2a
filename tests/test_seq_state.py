"""SequenceTable: the worker's state across plans, and the plans it must refuse."""

from __future__ import annotations

import pytest

from gpu_worker.seq_state import ScheduledSeq, SeqState, SequenceTable, StepPlanError
from protocol.messages import CachedSeq, NewSeq, StepPlan
from protocol.sampling import SamplingParams

BS = 4


def new_seq(
    rid: str,
    tokens: list[int],
    blocks: list[int],
    computed: int,
    scheduled: int,
    num_prompt: int | None = None,
    params: SamplingParams | None = None,
    eos: list[int] | None = None,
) -> NewSeq:
    return NewSeq(
        request_id=rid,
        token_ids=tokens,
        num_prompt_tokens=len(tokens) if num_prompt is None else num_prompt,
        block_ids=blocks,
        num_computed_tokens=computed,
        num_scheduled_tokens=scheduled,
        params=params or SamplingParams(),
        eos_token_ids=eos if eos is not None else [2],
        seed=1234,
    )


def view(scheduled: list[ScheduledSeq]) -> list[tuple[str, int, int, bool]]:
    return [(s.state.request_id, s.num_computed, s.num_scheduled, s.samples) for s in scheduled]


def test_new_then_cached_then_finished() -> None:
    table = SequenceTable(BS)
    params = SamplingParams(stop_token_ids=[7], min_tokens=1)
    out = table.apply(
        StepPlan(
            1,
            new_seqs=[
                new_seq("a", list(range(10, 20)), [1, 2, 3], 0, 10, params=params),
                new_seq("b", list(range(30, 50)), [4, 5], 0, 8),  # chunk 1 of a 20-token prompt
            ],
        )
    )
    assert view(out) == [("a", 0, 10, True), ("b", 0, 8, False)]
    a, b = table.seqs["a"], table.seqs["b"]
    assert a.stop_ids == [7, 2] and b.stop_ids == [2]
    assert a.block_ids == [1, 2, 3] and a.num_computed_tokens == 0 and a.num_output_tokens == 0
    a.token_ids.append(99)  # what the runner does with a's sample

    out = table.apply(
        StepPlan(2, cached_seqs=[CachedSeq("a", [], 10, 1), CachedSeq("b", [6, 7], 8, 8)])
    )
    assert view(out) == [("a", 10, 1, True), ("b", 8, 8, False)]
    assert a.num_output_tokens == 1 and a.num_computed_tokens == 10
    assert b.block_ids == [4, 5, 6, 7] and b.num_computed_tokens == 8

    out = table.apply(
        StepPlan(3, cached_seqs=[CachedSeq("b", [8], 16, 4)], finished_request_ids=["a", "unknown"])
    )
    assert view(out) == [("b", 16, 4, True)]
    assert sorted(table.seqs) == ["b"]
    assert b.block_ids == [4, 5, 6, 7, 8]


def test_ignore_eos_leaves_only_stop_tokens_banned() -> None:
    table = SequenceTable(BS)
    params = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    table.apply(StepPlan(1, new_seqs=[new_seq("a", [5, 6], [1], 0, 2, params=params, eos=[2, 3])]))
    assert table.seqs["a"].stop_ids == [7]
    assert table.seqs["a"].eos_token_ids == [2, 3]


def test_resumed_sequence_is_forgotten_then_readmitted_in_one_plan() -> None:
    """A preempted sequence comes back as a NewSeq whose token ids include its outputs."""
    table = SequenceTable(BS)
    table.apply(StepPlan(1, new_seqs=[new_seq("a", [1, 2, 3, 4, 5], [1, 2], 0, 5)]))
    table.seqs["a"].token_ids.append(60)
    resumed = new_seq("a", [1, 2, 3, 4, 5, 60], [3, 4], 4, 2, num_prompt=5)
    out = table.apply(StepPlan(2, new_seqs=[resumed], finished_request_ids=["a"]))
    assert view(out) == [("a", 4, 2, True)]
    state = table.seqs["a"]
    assert state.token_ids == [1, 2, 3, 4, 5, 60] and state.block_ids == [3, 4]
    assert state.num_prompt_tokens == 5 and state.num_output_tokens == 1
    assert state.num_computed_tokens == 4


def test_unknown_cached_sequence_is_refused() -> None:
    table = SequenceTable(BS)
    with pytest.raises(StepPlanError, match="ghost: scheduled as cached but the worker has no state"):
        table.apply(StepPlan(1, cached_seqs=[CachedSeq("ghost", [1], 0, 1)]))


def test_finished_then_cached_in_the_same_plan_is_refused() -> None:
    table = SequenceTable(BS)
    table.apply(StepPlan(1, new_seqs=[new_seq("a", [1, 2, 3], [1], 0, 3)]))
    with pytest.raises(StepPlanError, match="a: scheduled as cached"):
        table.apply(StepPlan(2, cached_seqs=[CachedSeq("a", [], 3, 1)], finished_request_ids=["a"]))


def test_scheduling_beyond_known_tokens_is_refused() -> None:
    table = SequenceTable(BS)
    with pytest.raises(StepPlanError, match="a: step 1 schedules tokens up to 4 but only 3 are known"):
        table.apply(StepPlan(1, new_seqs=[new_seq("a", [1, 2, 3], [1], 0, 4)]))

    table = SequenceTable(BS)
    table.apply(StepPlan(1, new_seqs=[new_seq("b", [1, 2, 3], [1], 0, 3)]))
    # The sample of step 1 has not been appended: a decode of token 4 runs ahead of it.
    with pytest.raises(StepPlanError, match="b: step 2 schedules tokens up to 4 but only 3 are known"):
        table.apply(StepPlan(2, cached_seqs=[CachedSeq("b", [], 3, 1)]))


def test_too_few_blocks_is_refused() -> None:
    table = SequenceTable(BS)
    with pytest.raises(StepPlanError, match="a: step 1 needs 5 token slots but its 1 blocks hold 4"):
        table.apply(StepPlan(1, new_seqs=[new_seq("a", [1, 2, 3, 4, 5], [1], 0, 5)]))

    table = SequenceTable(BS)
    table.apply(StepPlan(1, new_seqs=[new_seq("b", [1, 2, 3, 4], [1], 0, 4)]))
    table.seqs["b"].token_ids.append(9)
    with pytest.raises(StepPlanError, match="b: step 2 needs 5 token slots but its 1 blocks hold 4"):
        table.apply(StepPlan(2, cached_seqs=[CachedSeq("b", [], 4, 1)]))


@pytest.mark.parametrize(
    "num_tokens, computed, scheduled, samples",
    [(10, 0, 10, True), (10, 0, 8, False), (10, 8, 2, True), (11, 10, 1, True), (20, 8, 8, False)],
)
def test_samples_when_the_step_reaches_the_known_end(
    num_tokens: int, computed: int, scheduled: int, samples: bool
) -> None:
    state = SeqState("a", list(range(num_tokens)), 5, [], computed, SamplingParams(), [], 0)
    assert ScheduledSeq(state, computed, scheduled).samples is samples
