"""Prompt logprobs from the prefill (no second pass) agree with transformers in float32.

The engine runs with a small token budget, so prompts are prefilled in several chunks, and with
prefix caching on, so a repeated prompt would hit the cache: every prompt position must still
be scored. Plus the scheduler's pure bookkeeping (recomputed positions kept once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pdserve.offline_engine import OfflineEngine, make_request
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.messages import PromptLogprobsChunk, TokenLogprobs
from protocol.sampling import SamplingParams
from scheduler_svc.prompt_logprobs import accept_chunk, take_prompt_logprobs, wants_prompt_rows
from scheduler_svc.request import Request

TEXTS = [
    "The quick brown fox jumps over the lazy dog because it was in a hurry to get home.",
    "Paris is the capital of France.",
    "Paris is the capital of France.",  # the same prompt again: a prefix-cache hit if allowed
    "One",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1, and the full log-softmax rows, from one forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def test_prompt_logprobs_match_transformers(smollm2_dir, smollm2_tokenizer, hf_model):
    engine = OfflineEngine(
        ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=128, block_size=4),
        SchedulerSettings(max_num_batched_tokens=7), check_integrity=True,
    )
    assert engine.kv.enable_prefix_caching
    k = 3
    prompts = [smollm2_tokenizer.encode(t) for t in TEXTS]
    reqs = [make_request(f"r{i}", ids, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=k),
                         smollm2_tokenizer.eos_token_ids) for i, ids in enumerate(prompts)]
    done = engine.generate(reqs[:2]) + engine.generate(reqs[2:])  # r2 arrives once r1's blocks are cached
    worst = 0.0
    for ids, c in zip(prompts, done):
        rows = c.prompt_logprobs
        assert rows is not None and c.num_cached_tokens == 0
        assert rows.token_ids.shape == (len(ids) - 1, k + 1)
        assert rows.token_ids[:, 0].tolist() == ids[1:]
        if len(ids) == 1:
            continue
        ref = hf_prompt_logprobs(hf_model, ids)
        target = torch.tensor(ids[1:]).unsqueeze(1)
        ref_lp = ref.gather(1, target)[:, 0]
        worst = max(worst, float((torch.from_numpy(rows.logprobs[:, 0].copy()) - ref_lp).abs().max()))
        ref_rank = (ref >= ref.gather(1, target)).sum(-1)
        assert rows.ranks.tolist() == ref_rank.tolist()
        top = ref.topk(k, dim=-1)
        assert np.abs(rows.logprobs[:, 1:] - top.values.numpy()).max() <= 1e-3
        agree = (rows.token_ids[:, 1:] == top.indices.numpy()).mean()
        assert agree > 0.98, agree  # near-ties may swap places in float32
    assert worst <= 1e-3, worst


def _request(prompt_len: int, k: int | None = 1) -> Request:
    return Request("r", list(range(prompt_len)), SamplingParams(prompt_logprobs=k), [], 0.0, 0, 0, 0)


def _chunk(start: int, count: int) -> PromptLogprobsChunk:
    ids = np.arange(start, start + count, dtype=np.int64)[:, None].repeat(2, axis=1)
    return PromptLogprobsChunk("r", start, TokenLogprobs(ids, -ids.astype(np.float32), np.ones(count, np.int64)))


def test_recomputed_positions_are_kept_once():
    req = _request(10)
    assert wants_prompt_rows(req)
    accept_chunk(req, _chunk(1, 4))  # positions 1..4
    accept_chunk(req, _chunk(1, 6))  # recomputed after a preemption: 1..6, only 5..6 are new
    accept_chunk(req, _chunk(9, 1))  # a gap never fills in out of order
    accept_chunk(req, _chunk(7, 3))  # 7..9
    assert not wants_prompt_rows(req)
    rows = take_prompt_logprobs(req)
    assert rows is not None and rows.token_ids[:, 0].tolist() == list(range(1, 10))
    assert take_prompt_logprobs(req) is None  # sent once


def test_one_token_prompt_and_not_asked():
    req = _request(1)
    assert not wants_prompt_rows(req)
    rows = take_prompt_logprobs(req)
    assert rows is not None and rows.token_ids.shape == (0, 2)
    assert take_prompt_logprobs(_request(5, None)) is None and not wants_prompt_rows(_request(5, None))


def test_prompt_logprobs_survive_preemption(smollm2_dir, smollm2_tokenizer, hf_model):
    """Too few KV blocks for every request at once: some are preempted (mid-prefill or in
    decode) and recomputed; each prompt position still reaches the client once, and right."""
    engine = OfflineEngine(
        ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=14, block_size=4),
        SchedulerSettings(max_num_batched_tokens=12), check_integrity=True,
    )
    prompts = [smollm2_tokenizer.encode(t) for t in TEXTS[:2]] * 2
    reqs = [make_request(f"p{i}", ids, SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=0,
                                                      ignore_eos=True), smollm2_tokenizer.eos_token_ids)
            for i, ids in enumerate(prompts)]
    done = engine.generate(reqs)
    assert engine.scheduler.num_preemptions > 0
    for ids, c in zip(prompts, done):
        assert c.prompt_logprobs is not None and c.prompt_logprobs.token_ids[:, 0].tolist() == ids[1:]
        want = hf_prompt_logprobs(hf_model, ids).gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
        assert float((torch.from_numpy(c.prompt_logprobs.logprobs[:, 0].copy()) - want).abs().max()) <= 1e-3


def test_prompt_rows_per_step_are_bounded():
    from protocol.config import SchedulerSettings as Settings
    from scheduler_svc.kv_cache_manager import KVCacheManager
    from scheduler_svc.prompt_logprobs import MAX_PROMPT_ROWS_PER_STEP
    from scheduler_svc.worker_scheduler import WorkerScheduler

    sched = WorkerScheduler(Settings(max_num_batched_tokens=4096), KVCacheManager(1024, 16, True), 8192, 5000)
    long = list(range(1, 1300))
    sched.add_request(make_request("a", long, SamplingParams(prompt_logprobs=0), [0]))
    sched.add_request(make_request("b", long, SamplingParams(prompt_logprobs=0), [0]))
    sched.add_request(make_request("c", long, SamplingParams(), [0]))
    first = {s.request_id: s.num_scheduled_tokens for s in sched.schedule().new_seqs}
    assert first == {"a": MAX_PROMPT_ROWS_PER_STEP}  # b waits (FCFS): c is not admitted past it
    second = sched.schedule()
    assert [(s.request_id, s.num_scheduled_tokens) for s in second.cached_seqs] == [("a", MAX_PROMPT_ROWS_PER_STEP)]
    assert second.new_seqs == []
