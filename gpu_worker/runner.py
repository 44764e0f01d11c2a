"""The model runner: turns a StepPlan into one packed forward and one batched sample.

Its whole interface to the rest of pdserve is `execute(StepPlan) -> StepResult` plus the facts
the scheduler plans with (blocks, block size, context length, vocabulary); the same interface is
what a TensorRT backend implements later. Per step, Python touches each scheduled sequence only
to gather its indices; the arithmetic is batched tensor work on the device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from gpu_worker.attention import build_attention_metadata
from gpu_worker.cpu_kernels.build import KernelBuildError
from gpu_worker.cpu_kernels.paged_decode import SUPPORTED_DTYPES, PagedDecodeKernel
from gpu_worker.kv_cache import activation_reserve_bytes, allocate_kv_cache, plan_kv_cache
from protocol.model_files.model_source import resolve_model
from gpu_worker.loading.weights import iter_safetensors_weights
from gpu_worker.model import LlamaForCausalLM
from protocol.model_files.model_config import ModelConfig
from gpu_worker.sampler import sample
from gpu_worker.sampling_batch import SamplingBatch, SamplingRow
from gpu_worker.seq_state import ScheduledSeq, SeqState, SequenceTable
from protocol.config import CacheSettings, ConfigError, ModelSettings
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
        plan = plan_kv_cache(
            cfg, self.device, self.dtype, self.block_size,
            cache_settings.memory_utilization, cache_settings.num_kv_blocks,
            activation_reserve_bytes(cfg, max_num_batched_tokens, max_num_seqs, self.dtype),
        )
        self.num_kv_blocks = plan.num_blocks
        self.max_model_len = min(self.max_model_len, (plan.num_blocks - 1) * self.block_size)
        self.kv_cache, self.kv_caches = allocate_kv_cache(
            cfg, plan.num_blocks, self.block_size, self.device, self.dtype
        )
        self.seqs = SequenceTable(self.block_size)
        self.decode_kernel = _decode_kernel(model_settings, self.device, self.dtype, cfg.sliding_window)
        log.info(
            "model %s on %s/%s: %d KV blocks of %d tokens (%.0f MiB)",
            self.hf_dir.name, self.device, self.dtype, plan.num_blocks, self.block_size,
            plan.num_blocks * plan.block_bytes / 2**20,
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def reset(self) -> None:
        """Forget every sequence (the scheduler lost track of this worker and starts over)."""
        self.seqs = SequenceTable(self.block_size)

    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        scheduled = self.seqs.apply(plan)
        if not scheduled:
            return StepResult(plan.step_id, self.worker_id, [], np.empty(0, dtype=np.int64))
        input_ids, num_computed, num_scheduled, block_tables = _pack(scheduled)
        meta, positions = build_attention_metadata(
            num_computed, num_scheduled, block_tables, self.block_size,
            self.config.num_attention_heads // self.config.num_key_value_heads,
            self.config.sliding_window, self.device, self.decode_kernel,
        )
        hidden = self.model(
            torch.from_numpy(input_ids).to(self.device, non_blocking=True),
            torch.from_numpy(positions).to(self.device, non_blocking=True),
            meta, self.kv_caches,
        )
        sampled = [i for i, s in enumerate(scheduled) if s.samples]
        ends = np.cumsum(num_scheduled) - 1
        result = self._sample(plan.step_id, scheduled, sampled, hidden, ends)
        for s in scheduled:
            s.state.num_computed_tokens = s.num_computed + s.num_scheduled
        result.execute_seconds = time.perf_counter() - start
        return result

    def _sample(
        self,
        step_id: int,
        scheduled: list[ScheduledSeq],
        sampled: list[int],
        hidden: torch.Tensor,
        ends: np.ndarray,
    ) -> StepResult:
        if not sampled:
            return StepResult(step_id, self.worker_id, [], np.empty(0, dtype=np.int64))
        rows_idx = torch.from_numpy(ends[sampled]).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[rows_idx])
        states = [scheduled[i].state for i in sampled]
        rows = [_sampling_row(s) for s in states]
        out = sample(logits, SamplingBatch.build(rows, logits.shape[-1], self.device))
        tokens = out.token_ids.cpu().numpy()
        for state, tok in zip(states, tokens.tolist()):
            state.token_ids.append(tok)
        logprobs = None
        if out.logprobs is not None:
            logprobs = TokenLogprobs(
                token_ids=out.logprobs.token_ids.cpu().numpy(),
                logprobs=out.logprobs.logprobs.cpu().numpy(),
                ranks=out.logprobs.ranks.cpu().numpy(),
            )
        return StepResult(step_id, self.worker_id, [s.request_id for s in states], tokens, logprobs)


def _decode_kernel(
    settings: ModelSettings, device: torch.device, dtype: torch.dtype, sliding_window: int | None
) -> PagedDecodeKernel | None:
    """The C decode-attention kernel where the settings and the device allow it, else None."""
    backend = settings.attention_backend
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return None
    if device.type != "cpu" or dtype not in SUPPORTED_DTYPES:
        if backend == "cpu-c":
            raise ConfigError(f"attention_backend cpu-c runs on CPU in float32/bfloat16, not {device}/{dtype}")
        return None
    try:
        return PagedDecodeKernel(Path(settings.cache_dir).expanduser(), sliding_window)
    except (KernelBuildError, OSError) as exc:
        if backend == "cpu-c":
            raise ConfigError(f"attention_backend cpu-c: {exc}") from exc
        log.warning("C decode-attention kernel unavailable, using torch SDPA: %s", exc)
        return None


def _pack(scheduled: list[ScheduledSeq]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, progress and padded block tables of the scheduled sequences, in order."""
    count = len(scheduled)
    num_computed = np.fromiter((s.num_computed for s in scheduled), np.int64, count)
    num_scheduled = np.fromiter((s.num_scheduled for s in scheduled), np.int64, count)
    max_blocks = max(len(s.state.block_ids) for s in scheduled)
    block_tables = np.zeros((count, max_blocks), dtype=np.int64)
    ids: list[int] = []
    for i, s in enumerate(scheduled):
        block_tables[i, : len(s.state.block_ids)] = s.state.block_ids
        ids.extend(s.state.token_ids[s.num_computed : s.num_computed + s.num_scheduled])
    return np.asarray(ids, dtype=np.int64), num_computed, num_scheduled, block_tables


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
