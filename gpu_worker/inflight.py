"""A launched step whose sampled tokens may still be on the device, and what feeds them forward.

With overlapped steps the worker launches step N+1 while step N still runs on the GPU: N+1's
decode inputs are N's samples, which exist only on the device. When N is launched, each sampling
sequence gets a PLACEHOLDER appended to its tokens (so N+1's plan checks, packing and min_tokens
counts see the right lengths); N+1's executor call then copies the real ids from N's device
tensor into its input buffer (`FedTokens`), and `InFlightStep.resolve` overwrites the
placeholders once N's copy back to the host is done. On CPU a step is complete when launched, so
resolving is immediate and nothing is ever fed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.seq_state import SeqState
from protocol.messages import PromptLogprobsChunk

PLACEHOLDER = -1  # a token id that is sampled but not yet on the host


@dataclass
class FedTokens:
    """Packed input rows whose token is a previous step's sample, and those samples (device)."""

    rows: torch.Tensor  # int64 [F], device
    values: torch.Tensor  # int64 [F], device


@dataclass
class DeviceTimer:
    """CUDA events around one step's device work (None on CPU)."""

    start: torch.cuda.Event
    end: torch.cuda.Event

    @classmethod
    def started(cls, device: torch.device) -> DeviceTimer | None:
        if device.type != "cuda":
            return None
        timer = cls(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        timer.start.record()
        return timer


@dataclass
class InFlightStep:
    step_id: int
    states: list[SeqState]  # sampling sequences, in row order
    slots: list[int]  # index in each state's token_ids that holds its placeholder
    tokens: torch.Tensor  # int64 [N] on the device
    host_tokens: torch.Tensor  # int64 [N] on the host (pinned on CUDA), filled by `done`
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # ids, logprobs, ranks
    done: torch.cuda.Event | None  # the copies to the host are complete (None: already on host)
    timer: DeviceTimer | None
    launched_at: float  # perf_counter when launch began
    rows_by_request: dict[str, int] = field(default_factory=dict)
    prompt_logprobs: list[PromptLogprobsChunk] = field(default_factory=list)  # already on the host
    request_errors: dict[str, str] = field(default_factory=dict)  # rows whose grammar failed
    resolved: bool = False

    def resolve(self) -> np.ndarray:
        """Wait for the sampled ids on the host and put them in place of the placeholders."""
        if self.done is not None:
            self.done.synchronize()
        tokens = self.host_tokens.numpy()
        if not self.resolved:
            for state, slot, tok in zip(self.states, self.slots, tokens.tolist()):
                state.token_ids[slot] = tok
            self.resolved = True
        return tokens

    def feed(self, input_ids: np.ndarray, query_start: np.ndarray, request_ids: list[str],
             device: torch.device) -> FedTokens | None:
        """The rows of `input_ids` that hold this step's placeholders and their device values.

        `request_ids[s]` is the request of packed sequence s (rows query_start[s]:[s+1]).
        A placeholder that is not one of this step's samples is a bookkeeping bug: ValueError.
        """
        rows = np.flatnonzero(input_ids == PLACEHOLDER)
        if rows.size == 0 or self.resolved:
            if rows.size:
                raise ValueError(f"step {self.step_id} is resolved but placeholders remain")
            return None
        seqs = np.searchsorted(query_start, rows, side="right") - 1
        try:
            src = np.fromiter((self.rows_by_request[request_ids[s]] for s in seqs.tolist()), np.int64, len(seqs))
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]}: an unknown token is not a sample of step {self.step_id}") from None
        return FedTokens(
            rows=pinned_to_device(rows.astype(np.int64), device),
            values=self.tokens.index_select(0, pinned_to_device(src, device)),
        )


def pinned_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without stalling the host: on CUDA through pinned memory with a
    non-blocking copy (a copy from pageable memory may wait for the stream, which would undo
    overlapped steps). torch's pinned allocator keeps the buffer until the copy has run."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
