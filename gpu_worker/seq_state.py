"""The worker's view of its sequences: tokens, block table and progress, kept across steps.

The worker holds every token it has sampled, so a decode step from the scheduler needs no token
ids (`CachedSeq`), and the scheduler may send step N+1 before step N's result arrives: by the
time the worker runs N+1 it has appended N's sample itself. Pure bookkeeping, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.messages import CachedSeq, NewSeq, StepPlan
from protocol.sampling import SamplingParams


class StepPlanError(ValueError):
    """A plan that contradicts the worker's state (unknown sequence, tokens not yet known)."""


@dataclass
class SeqState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    eos_token_ids: list[int]
    seed: int
    stop_ids: list[int] = field(default_factory=list)  # banned while under min_tokens
    grammar: Any = None  # structured output: its SeqGrammar (gpu_worker.structured), made lazily

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class ScheduledSeq:
    state: SeqState
    num_computed: int
    num_scheduled: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new one is sampled."""
        return self.num_computed + self.num_scheduled == len(self.state.token_ids)


# Failed request ids kept so that plans sent before the scheduler heard of a failure skip them.
MAX_FAILED_REMEMBERED = 65536


class SequenceTable:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seqs: dict[str, SeqState] = {}
        self.failed: dict[str, None] = {}  # insertion-ordered set of requests whose step failed

    def apply(self, plan: StepPlan) -> list[ScheduledSeq]:
        """Forget finished sequences, admit new ones, extend cached ones; return this step's.

        Cached sequences of requests whose earlier step failed are skipped: the scheduler
        planned this step before it heard of the failure, and has failed those requests since.
        """
        for rid in plan.finished_request_ids:
            self.seqs.pop(rid, None)
            self.failed.pop(rid, None)
        scheduled = [self._admit(s) for s in plan.new_seqs]
        scheduled += [self._extend(s) for s in plan.cached_seqs
                      if not (s.request_id in self.failed and s.request_id not in self.seqs)]
        for item in scheduled:
            end = item.num_computed + item.num_scheduled
            if end > len(item.state.token_ids):
                raise StepPlanError(
                    f"{item.state.request_id}: step {plan.step_id} schedules tokens up to {end} "
                    f"but only {len(item.state.token_ids)} are known"
                )
            if end > len(item.state.block_ids) * self.block_size:
                raise StepPlanError(
                    f"{item.state.request_id}: step {plan.step_id} needs {end} token slots but "
                    f"its {len(item.state.block_ids)} blocks hold {len(item.state.block_ids) * self.block_size}"
                )
        return scheduled

    def fail(self, plan: StepPlan) -> None:
        """Forget the sequences of a plan that could not run, remembering their ids."""
        for s in [*plan.new_seqs, *plan.cached_seqs]:
            self.seqs.pop(s.request_id, None)
            self.failed[s.request_id] = None
        while len(self.failed) > MAX_FAILED_REMEMBERED:
            del self.failed[next(iter(self.failed))]

    def _admit(self, s: NewSeq) -> ScheduledSeq:
        params = s.params
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(s.eos_token_ids))
        state = SeqState(
            request_id=s.request_id,
            token_ids=list(s.token_ids),
            num_prompt_tokens=s.num_prompt_tokens,
            block_ids=list(s.block_ids),
            num_computed_tokens=s.num_computed_tokens,
            params=params,
            eos_token_ids=list(s.eos_token_ids),
            seed=s.seed,
            stop_ids=stop_ids,
        )
        self.seqs[s.request_id] = state
        return ScheduledSeq(state, s.num_computed_tokens, s.num_scheduled_tokens)

    def _extend(self, s: CachedSeq) -> ScheduledSeq:
        state = self.seqs.get(s.request_id)
        if state is None:
            raise StepPlanError(f"{s.request_id}: scheduled as cached but the worker has no state")
        state.block_ids.extend(s.new_block_ids)
        state.num_computed_tokens = s.num_computed_tokens
        return ScheduledSeq(state, s.num_computed_tokens, s.num_scheduled_tokens)
