"""The step-level contract, `StepExecutor.forward(step) -> logits`, and its eager form.

The runner owns bookkeeping (the sequence table), packing (gpu_worker.step_inputs) and sampling
(gpu_worker.sampler); between them it asks an executor for one thing: run the model over the
step's packed tokens, writing their keys and values into the KV cache, and return float32
logits [len(step.sample_seqs), vocab] for the last token of each sampling sequence, in order,
followed by the logits of `step.prompt_rows` when a request asked for prompt logprobs.
The eager executor does that with the shared model and a layer backend; the CUDA-graph executor
(gpu_worker.backends.cuda_graphs) replays captured decode steps; a TensorRT engine would be one
more implementation that binds the same StepInputs arrays.

`fed` (optional) names packed rows whose input token is not in `step.input_ids` but on the
device, sampled by the step before (overlapped steps, gpu_worker.inflight): an executor copies
those values into its input ids on the device before the model runs.
"""

from __future__ import annotations

from typing import Protocol

import torch

from gpu_worker.backends.base import AttentionBackend
from gpu_worker.inflight import FedTokens, pinned_to_device
from gpu_worker.model import LlamaForCausalLM
from gpu_worker.step_inputs import StepInputs


class StepExecutor(Protocol):
    name: str

    def forward(self, step: StepInputs, fed: FedTokens | None = None) -> torch.Tensor:
        """float32 logits [len(step.logit_rows), vocab]; KV of every scheduled token written."""
        ...


class EagerExecutor:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
        self.name = f"{backend.name} eager"

    @torch.inference_mode()
    def forward(self, step: StepInputs, fed: FedTokens | None = None) -> torch.Tensor:
        meta = self.backend.prepare(step)
        ids = pinned_to_device(step.input_ids, self.device)
        if fed is not None:
            ids.index_copy_(0, fed.rows, fed.values)
        x, residual = self.model(ids, meta, self.kv_caches, self.backend)
        logit_rows = step.logit_rows
        if len(logit_rows) == 0:
            return torch.empty(0, self.model.cfg.vocab_size, device=self.device)
        rows = pinned_to_device(logit_rows, self.device)
        return self.model.compute_logits(x, residual, rows, self.backend)
