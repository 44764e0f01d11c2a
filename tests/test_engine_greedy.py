"""Greedy outputs of the offline engine equal transformers' generate(do_sample=False), token for token.

On the bundled SmolLM2 (several chat prompts of different lengths run as one batch), with a small
prefill chunk, with prefix-cache hits, and across forced preemptions; check_integrity() runs after
every scheduler step. The reference runs one prompt at a time, the engine batches them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from pdserve.offline_engine import OfflineEngine, make_request

pytestmark = pytest.mark.slow

MAX_NEW = 40
SYSTEM = (
    "You are a careful assistant for a small library. Answer briefly, stay polite, and "
    "when you are unsure say so instead of guessing. Library hours are nine to five."
)
QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Explain in two sentences why the sky is blue, for a ten year old child who loves science.",
    "List three fruits.",
    "I have a long question. My grandmother used to bake bread every Sunday, and the whole "
    "house smelled wonderful. I want to start baking too, but I have never done it. What do "
    "I need to buy first, and what simple recipe should I try for my first loaf?",
]


def _chats(with_system: bool) -> list[list[dict[str, str]]]:
    head = [{"role": "system", "content": SYSTEM}] if with_system else []
    return [head + [{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def hf_greedy(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False)
        outs.append(y[0, len(ids) :].tolist())
    return outs


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> dict[str, list[list[int]]]:
    return {
        name: [smollm2_tokenizer.apply_chat_template(c) for c in _chats(sys_)]
        for name, sys_ in (("plain", False), ("system", True))
    }


@pytest.fixture(scope="module")
def references(hf_model, prompts) -> dict[str, list[list[int]]]:
    return {name: hf_greedy(hf_model, p, MAX_NEW) for name, p in prompts.items()}


def run_engine(
    model_dir: Path, prompts: list[list[int]], eos: list[int], max_new: int = MAX_NEW, **kw
) -> tuple[OfflineEngine, list]:
    engine = OfflineEngine(
        ModelSettings(model=str(model_dir)),
        CacheSettings(num_kv_blocks=kw.pop("num_kv_blocks", 256), block_size=kw.pop("block_size", 16)),
        SchedulerSettings(**kw),
        check_integrity=True,
    )
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    reqs = [make_request(f"r{i}", p, params, eos) for i, p in enumerate(prompts)]
    return engine, engine.generate(reqs)


def _tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def test_batch_matches_transformers(smollm2_dir, smollm2_tokenizer, prompts, references):
    engine, out = run_engine(smollm2_dir, prompts["plain"], smollm2_tokenizer.eos_token_ids)
    assert _tokens(out) == references["plain"]
    assert len({len(p) for p in prompts["plain"]}) == len(QUESTIONS)  # lengths really differ
    assert engine.kv.usage == 0.0


def test_small_prefill_chunks_match_transformers(smollm2_dir, smollm2_tokenizer, prompts, references):
    engine, out = run_engine(
        smollm2_dir, prompts["plain"], smollm2_tokenizer.eos_token_ids, max_num_batched_tokens=16
    )
    assert _tokens(out) == references["plain"]
    assert engine.num_steps > MAX_NEW + max(len(p) for p in prompts["plain"]) // 16 - 1


def test_prefix_cache_hits_match_transformers(smollm2_dir, smollm2_tokenizer, prompts, references):
    engine = OfflineEngine(
        ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=256),
        SchedulerSettings(), check_integrity=True,
    )
    eos = smollm2_tokenizer.eos_token_ids
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    first = engine.generate([make_request("warm", prompts["system"][0], params, eos)])
    assert first[0].token_ids == references["system"][0]
    reqs = [make_request(f"r{i}", p, params, eos) for i, p in enumerate(prompts["system"])]
    out = engine.generate(reqs)
    assert _tokens(out) == references["system"]
    shared = len(smollm2_tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}]))
    assert all(c.num_cached_tokens >= (shared // 16) * 16 for c in out)
    assert out[0].num_cached_tokens == ((len(prompts["system"][0]) - 1) // 16) * 16


def test_forced_preemption_matches_transformers(smollm2_dir, smollm2_tokenizer, prompts, references):
    # 39 usable blocks of 8 tokens cannot hold six ~80-token prompts and their outputs at once.
    engine, out = run_engine(
        smollm2_dir, prompts["system"], smollm2_tokenizer.eos_token_ids,
        num_kv_blocks=40, block_size=8,
    )
    assert engine.scheduler.num_preemptions > 0
    assert _tokens(out) == references["system"]
    assert engine.kv.usage == 0.0
