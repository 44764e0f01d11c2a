"""The model runner: turns a StepPlan into one packed forward and one batched sample.

Its whole interface to the rest of pdserve is `execute(StepPlan) -> StepResult` plus the facts
the scheduler plans with (blocks, block size, context length, vocabulary). Inside, a step is
bookkeeping (the SequenceTable), packing into generic StepInputs (gpu_worker.step_inputs), one
call of the step executor (gpu_worker.backends: torch, cpu-c or triton, with CUDA graphs for
decode steps on triton) that returns the sampled rows' logits, and the shared sampler. Per step,
Python touches each scheduled sequence only to gather its indices.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from gpu_worker.backends.executor import EagerExecutor, StepExecutor
from gpu_worker.backends.select import decode_kernel as _decode_kernel  # noqa: F401 (tests use it)
from gpu_worker.backends.select import select_backend
from gpu_worker.inflight import PLACEHOLDER, DeviceTimer, InFlightStep
from gpu_worker.kv_cache import (
    activation_reserve_bytes, allocate_kv_cache, graph_reserve_bytes, measure_peak_bytes, plan_kv_cache,
)
from protocol.model_files.model_source import resolve_model
from gpu_worker.loading.weights import iter_safetensors_weights
from gpu_worker.model import LlamaForCausalLM
from gpu_worker.prompt_logprobs import gather_prompt_logprobs, select_prompt_rows
from protocol.model_files.model_config import ModelConfig
from gpu_worker.sampler import sample
from gpu_worker.sampling_batch import SamplingBatch, SamplingRow
from gpu_worker.seq_state import SeqState, SequenceTable
from gpu_worker.structured.step_masks import MaskJob, StructuredDecoding
from gpu_worker.step_inputs import build_step_inputs, step_inputs_from_arrays
from protocol.config import CacheSettings, ConfigError, ModelSettings
from protocol.grammar_compiler import GrammarCompiler
from protocol.messages import StepPlan, StepResult, TokenLogprobs

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelRunner:
    def __init__(
        self,
        model_settings: ModelSettings,
        cache_settings: CacheSettings,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        worker_id: str = "worker-0",
    ) -> None:
        self.worker_id = worker_id
        self.device = resolve_device(model_settings.device)
        if self.device.type == "cpu":
            # Tiny activations turn into denormal floats, which x86 cores process ~100x slower;
            # flushing them to zero made decode steps 6x faster here and changes no argmax.
            torch.set_flush_denormal(True)
        self.dtype = resolve_dtype(model_settings.dtype, self.device)
        self.block_size = cache_settings.block_size
        self.hf_dir = resolve_model(
            model_settings.model, Path(model_settings.cache_dir).expanduser(),
            need_weights=model_settings.load_format != "dummy",
        )
        self.config = ModelConfig.from_dir(self.hf_dir)
        cfg = self.config
        self.max_model_len = min(
            model_settings.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        self.model = LlamaForCausalLM(cfg, self.dtype, self.device, self.max_model_len)
        if model_settings.load_format == "dummy":
            self.model.init_dummy_weights(model_settings.seed)
        else:
            self.model.load_weights(iter_safetensors_weights(self.hf_dir))
        self.model.prepare()
        self.backend = select_backend(model_settings, cfg, self.device, self.dtype)
        graph_sizes = self._graph_sizes(model_settings, max_num_seqs)
        if model_settings.kernel_tuning == "auto" and self.backend.name == "triton":
            from gpu_worker.kernel_tuning import tune_kernels

            tune_kernels(self.model, self.backend, cfg, graph_sizes, self.dtype, self.block_size, self.max_model_len)
        reserve = 0 if cache_settings.num_kv_blocks is not None else self._reserve_bytes(
            max_num_batched_tokens, max_num_seqs, graph_sizes)
        plan = plan_kv_cache(
            cfg, self.device, self.dtype, self.block_size,
            cache_settings.memory_utilization, cache_settings.num_kv_blocks, reserve,
        )
        self.num_kv_blocks = plan.num_blocks
        self.max_model_len = min(self.max_model_len, (plan.num_blocks - 1) * self.block_size)
        self.kv_cache, self.kv_caches = allocate_kv_cache(
            cfg, plan.num_blocks, self.block_size, self.device, self.dtype
        )
        self.seqs = SequenceTable(self.block_size)
        self.overlap = _overlap(model_settings.overlap_steps, self.device)
        self._last_finish = 0.0  # perf_counter when the last step's result was built
        self._last_timer: DeviceTimer | None = None  # the last finished step's device events
        self.structured = StructuredDecoding(GrammarCompiler.for_dir(self.hf_dir, cfg.vocab_size))
        self.executor: StepExecutor = EagerExecutor(self.model, self.backend, self.kv_caches, self.device)
        graph_note = ""
        if graph_sizes:
            from gpu_worker.backends.cuda_graphs import CudaGraphExecutor

            graphs = CudaGraphExecutor(
                self.executor, graph_sizes, -(-self.max_model_len // self.block_size), self.max_model_len,
            )
            before = torch.cuda.memory_reserved(self.device)
            seconds = graphs.capture()
            self.executor = graphs
            graph_note = (f"; {len(graph_sizes)} CUDA graphs (batch {graph_sizes[0]}..{graph_sizes[-1]}) "
                          f"in {seconds:.1f} s, "
                          f"{(torch.cuda.memory_reserved(self.device) - before) / 2**20:.0f} MiB")
        log.info(
            "model %s on %s/%s, %s backend: %d KV blocks of %d tokens (%.0f MiB, %d tokens)%s",
            self.hf_dir.name, self.device, self.dtype, self.backend.name, plan.num_blocks,
            self.block_size, plan.num_blocks * plan.block_bytes / 2**20,
            plan.num_blocks * self.block_size, graph_note,
        )

    def _graph_sizes(self, settings: ModelSettings, max_num_seqs: int) -> list[int]:
        """Decode batch sizes to capture: none unless CUDA, a graph-capable backend, not eager."""
        if self.device.type != "cuda" or settings.enforce_eager or not self.backend.supports_cuda_graphs:
            return []
        from gpu_worker.backends.graph_layout import graph_batch_sizes

        return graph_batch_sizes(max_num_seqs)

    def _reserve_bytes(self, max_tokens: int, max_seqs: int, graph_sizes: list[int]) -> int:
        """Memory kept free of the KV cache. CPU: the fixed bound (as always). CUDA: a measured
        forward of a full token budget, the sampler's buffers and the graphs' pool."""
        bound = activation_reserve_bytes(self.config, max_tokens, max_seqs, self.dtype)
        if self.device.type != "cuda":
            return bound
        forward = measure_peak_bytes(self.device, lambda: self._profile_forward(max_tokens, max_seqs))
        sampler = max_seqs * self.config.vocab_size * 4 * 4
        graphs = graph_reserve_bytes(self.config, graph_sizes[-1], self.dtype) if graph_sizes else 0
        log.info("activation memory: forward of %d tokens %.0f MiB (bound %.0f), sampler %.0f MiB, "
                 "graphs %.0f MiB", max_tokens, forward / 2**20, bound / 2**20, sampler / 2**20, graphs / 2**20)
        return forward + sampler + graphs

    def _profile_forward(self, max_tokens: int, max_seqs: int) -> None:
        """One eager forward of `max_tokens` prompt tokens (as few sequences as the context
        allows) over a scratch cache just big enough, sampling rows included."""
        length = max(1, min(max_tokens, self.max_model_len))
        lens = [length] * (max_tokens // length) + ([max_tokens % length] if max_tokens % length else [])
        per_seq = -(-length // self.block_size)
        _, scratch = allocate_kv_cache(self.config, 1 + per_seq * len(lens), self.block_size, self.device, self.dtype)
        tables = 1 + np.arange(len(lens) * per_seq, dtype=np.int64).reshape(len(lens), per_seq)
        query_lens = np.asarray(lens, dtype=np.int64)
        step = step_inputs_from_arrays(
            np.zeros(int(query_lens.sum()), dtype=np.int64), np.zeros(len(lens), dtype=np.int64),
            query_lens, tables, self.block_size, np.arange(min(len(lens), max_seqs), dtype=np.int64),
        )
        EagerExecutor(self.model, self.backend, scratch, self.device).forward(step)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def reset(self) -> None:
        """Forget every sequence (the scheduler lost track of this worker and starts over)."""
        self.seqs = SequenceTable(self.block_size)
        self._last_timer = None

    def fail(self, plan: StepPlan) -> None:
        """A plan could not run: forget its sequences; later plans that still list them (sent
        before the scheduler heard of the failure) skip them instead of failing too."""
        self.seqs.fail(plan)

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step to the end: launch it, then wait for its tokens."""
        return self.finish(self.launch(plan))

    def launch(self, plan: StepPlan, previous: InFlightStep | None = None) -> InFlightStep:
        """Queue the step's device work and return without waiting for its samples.

        `previous` is the step launched before this one whose tokens may not be on the host yet:
        its samples are fed to this step on the device. When a sampling row here needs its
        token history (penalties, grammars), the previous step is resolved once this step's
        forward is queued: the device runs the forward while the host waits for those tokens.
        """
        launched_at = time.perf_counter()
        timer = DeviceTimer.started(self.device)
        scheduled = self.seqs.apply(plan)
        pending = previous is not None and not previous.resolved
        # Penalties read the token history, and a grammar's matcher consumes every token (it
        # catches up in StructuredDecoding.start): the previous samples must be on the host
        # before sampling, but the forward does not need them (they are fed on the device).
        history = pending and any(s.samples and _needs_history(s.state.params) for s in scheduled)
        step = build_step_inputs(scheduled, self.block_size)
        states = [scheduled[i].state for i in step.sample_seqs]
        masks = None if history else self.structured.start(states)  # built during the forward
        prompt_rows = select_prompt_rows(scheduled, step)
        if prompt_rows is not None:
            step.prompt_rows = prompt_rows.rows
        fed = None
        if pending and step.num_tokens:
            fed = previous.feed(step.input_ids, step.query_start,  # type: ignore[union-attr]
                                [s.state.request_id for s in scheduled], self.device)
        logits = self.executor.forward(step, fed) if scheduled else None
        if history:
            previous.resolve()  # type: ignore[union-attr]
            masks = self.structured.start(states)  # still during this step's forward
        prompt_logprobs = []
        if prompt_rows is not None and logits is not None:  # reads them back now: no overlap here
            prompt_logprobs = gather_prompt_logprobs(logits[len(states):], prompt_rows)
            logits = logits[: len(states)]
        for s in scheduled:
            s.state.num_computed_tokens = s.num_computed + s.num_scheduled
        launched = self._sample(plan.step_id, states, logits, timer, launched_at, masks)
        launched.prompt_logprobs = prompt_logprobs
        return launched

    def finish(self, step: InFlightStep) -> StepResult:
        """Wait for a launched step's samples and report them."""
        tokens = step.resolve()
        logprobs = None
        if step.host_logprobs is not None:
            ids, values, ranks = (t.numpy() for t in step.host_logprobs)
            logprobs = TokenLogprobs(token_ids=ids, logprobs=values, ranks=ranks)
        now = time.perf_counter()
        result = StepResult(step.step_id, self.worker_id, [s.request_id for s in step.states],
                            tokens.copy(), logprobs, prompt_logprobs=step.prompt_logprobs,
                            request_errors=step.request_errors)
        # Overlapped steps overlap in time too: count each wall second once.
        result.execute_seconds = now - max(step.launched_at, self._last_finish)
        self._last_finish = now
        if step.timer is not None:
            result.gpu_seconds = step.timer.start.elapsed_time(step.timer.end) / 1e3
            if self._last_timer is not None:
                result.gpu_gap_seconds = max(0.0, self._last_timer.end.elapsed_time(step.timer.start) / 1e3)
            self._last_timer = step.timer
        return result

    def starved(self) -> None:
        """The worker had no step to run: the next device gap is for want of work, not overhead."""
        self._last_timer = None

    def _sample(self, step_id: int, states: list[SeqState], logits: torch.Tensor | None,
                timer: DeviceTimer | None, launched_at: float, masks: MaskJob | None = None) -> InFlightStep:
        rows = [_sampling_row(s) for s in states]
        if states:
            assert logits is not None
            grammar = None if masks is None else masks.result()  # before placeholders are appended
            allowed = None if grammar is None else grammar.bitmask
            out = sample(logits, SamplingBatch.build(rows, logits.shape[-1], self.device, allowed))
            tokens, lp = out.token_ids, out.logprobs
        else:
            tokens, lp, grammar = torch.zeros(0, dtype=torch.int64, device=self.device), None, None
        host_tokens = _to_host(tokens)
        host_logprobs = None if lp is None else (_to_host(lp.token_ids), _to_host(lp.logprobs), _to_host(lp.ranks))
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        if timer is not None:
            timer.end.record()
        slots = []
        for s in states:
            slots.append(len(s.token_ids))
            s.token_ids.append(PLACEHOLDER)
        return InFlightStep(
            step_id=step_id, states=states, slots=slots, tokens=tokens, host_tokens=host_tokens,
            host_logprobs=host_logprobs, done=done, timer=timer, launched_at=launched_at,
            rows_by_request={s.request_id: i for i, s in enumerate(states)},
            request_errors={} if grammar is None else grammar.errors,
        )


def _overlap(setting: str, device: torch.device) -> bool:
    """auto: overlap on CUDA only. On CPU a launch runs the whole step, so overlapping would
    only hold step N's result until N+1 has been computed."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy on the host, queued without waiting (pinned memory on CUDA)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _needs_history(p) -> bool:
    """Sampling that reads the sequence's earlier tokens (so they must be on the host):
    penalties, and a grammar (structured output) whose matcher has to consume them."""
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or p.structured is not None)


def _sampling_row(state: SeqState) -> SamplingRow:
    p = state.params
    n_out = state.num_output_tokens
    # Token histories are copied only for the penalties that read them: this runs every step.
    rep = p.repetition_penalty != 1.0
    outputs_needed = rep or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    return SamplingRow(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=state.seed,
        output_index=n_out,
        prompt_token_ids=state.token_ids[: state.num_prompt_tokens] if rep else (),
        output_token_ids=state.token_ids[state.num_prompt_tokens :] if outputs_needed else (),
        banned_token_ids=state.stop_ids if n_out < p.min_tokens else (),
        num_logprobs=p.logprobs,
    )
