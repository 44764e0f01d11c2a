"""The grammar side of one step: masks computed while the model runs.

`start` hands the step's sampling rows to a helper thread, which brings each grammar row's
matcher up to date (creating it on first sight, replaying outputs the sequence already has)
and fills that row's bitmask; llguidance releases the GIL, so on a GPU this runs while the
device computes the forward, and on CPU it runs on a spare core beside torch's threads (the
forward there is synchronous Python, so the overlap is real only where a core is free). The
runner collects the masks (`MaskJob.result`) just before sampling; the next `start` catches
each matcher up with the tokens sampled since. Steps without grammar rows cost nothing:
`start` returns None.

A row whose grammar failed (it does not compile, the outputs it replays do not match, the
matcher errs, or llguidance raises) allows only EOS and is listed in `StepMasks.errors`: the
step reports it, and the scheduler ends that request with the error. Other rows are untouched.

The masks must describe the state after every output already sampled. With overlapped steps
(gpu_worker.inflight) the runner therefore resolves the step in flight before it launches a
step with grammar rows, so no placeholder is ever fed to a matcher.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpu_worker.structured.grammar_matcher import SeqGrammar
from gpu_worker.structured.token_bitmask import full_bitmask
from protocol.grammar_compiler import GrammarCompiler

if TYPE_CHECKING:
    from gpu_worker.seq_state import SeqState

log = logging.getLogger(__name__)


@dataclass
class StepMasks:
    bitmask: np.ndarray  # int32 [rows, words]; unconstrained rows allow everything
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why its grammar failed


class MaskJob:
    """Masks being computed for one step's sampling rows."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def result(self) -> StepMasks:
        return self._future.result()


class StructuredDecoding:
    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._pool: ThreadPoolExecutor | None = None

    def start(self, states: Sequence[SeqState]) -> MaskJob | None:
        rows = [(i, s) for i, s in enumerate(states) if s.params.structured is not None]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return MaskJob(self._pool.submit(self._fill, rows, len(states)))

    def _fill(self, rows: list[tuple[int, SeqState]], num_rows: int) -> StepMasks:
        masks = StepMasks(full_bitmask(num_rows, self.compiler.vocab_size))
        for i, state in rows:
            grammar = state.grammar
            try:
                if grammar is None:
                    grammar = state.grammar = SeqGrammar.start(
                        self.compiler, state.params.structured, state.eos_token_ids)
                grammar.sync(state.token_ids, state.num_prompt_tokens)
                grammar.fill(masks.bitmask[i])
            except Exception as exc:  # llguidance raised: fail this row, never the whole step
                log.exception("grammar of %s", state.request_id)
                if grammar is None:
                    grammar = state.grammar = SeqGrammar(None, state.eos_token_ids)
                grammar.fail(f"the grammar matcher raised {type(exc).__name__}: {exc}")
                grammar.fill_eos_only(masks.bitmask[i])
            if grammar.failed:
                masks.errors[state.request_id] = grammar.error or "the grammar matcher failed"
        return masks

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
