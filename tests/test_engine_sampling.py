"""Seeded sampling gives the same tokens alone and inside a batch; logprobs and stops end to end."""

from __future__ import annotations

import math

import pytest

from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.messages import FinishReason
from protocol.sampling import SamplingParams
from pdserve.offline_engine import OfflineEngine, make_request

pytestmark = pytest.mark.slow

SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=40, seed=1234,
                        repetition_penalty=1.1)


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return OfflineEngine(
        ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=256),
        SchedulerSettings(max_num_batched_tokens=64), check_integrity=True,
    )


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}])


def test_seeded_request_is_identical_alone_and_in_a_batch(engine, smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_ids
    prompt = _chat(tok, "Tell me a short story about a brave mouse.")
    alone = engine.generate([make_request("alone", prompt, SEEDED, eos)])[0].token_ids
    assert len(alone) > 3

    others = [
        make_request(f"o{i}", _chat(tok, q), SamplingParams(max_tokens=30, temperature=1.0), eos)
        for i, q in enumerate(["Hello there.", "Name a color.", "Why do cats purr? Explain.", "Count to five."])
    ]
    batch = others[:2] + [make_request("seeded", prompt, SEEDED, eos)] + others[2:]
    out = {c.request_id: c.token_ids for c in engine.generate(batch)}
    assert out["seeded"] == alone

    other_seed = SamplingParams(**{**{f: getattr(SEEDED, f) for f in SEEDED.__struct_fields__}, "seed": 99})
    different = engine.generate([make_request("s99", prompt, other_seed, eos)])[0].token_ids
    assert different != alone


def test_logprobs_and_stop_token(engine, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = _chat(tok, "What is the capital of France?")
    greedy = engine.generate(
        [make_request("g", prompt, SamplingParams(max_tokens=12, temperature=0.0), tok.eos_token_ids)]
    )[0]
    stop_at = greedy.token_ids[3]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, stop_token_ids=[stop_at])
    c = engine.generate([make_request("lp", prompt, params, tok.eos_token_ids)])[0]
    assert c.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_at) + 1]
    assert c.finish_reason == FinishReason.STOP and c.stop_token_id == stop_at
    assert len(c.logprobs) == len(c.token_ids)
    for tid, lp in zip(c.token_ids, c.logprobs):
        assert lp.token_ids.shape == (1, 4)
        assert int(lp.token_ids[0, 0]) == tid and int(lp.ranks[0]) == 1  # greedy: rank 1
        assert int(lp.token_ids[0, 1]) == tid  # the best token is the sampled one
        assert lp.logprobs[0, 0] <= 0.0 and math.isclose(lp.logprobs[0, 0], lp.logprobs[0, 1])


def test_min_tokens_and_ignore_eos(engine, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = _chat(tok, "Say hi.")
    short = engine.generate([make_request("s", prompt, SamplingParams(max_tokens=64, temperature=0.0), tok.eos_token_ids)])[0]
    assert short.finish_reason == FinishReason.STOP and len(short.token_ids) < 40
    n = len(short.token_ids) + 5
    forced = engine.generate(
        [make_request("m", prompt, SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0), tok.eos_token_ids)]
    )[0]
    assert len(forced.token_ids) == n and forced.finish_reason == FinishReason.LENGTH
    assert not set(forced.token_ids) & set(tok.eos_token_ids)
    ignoring = engine.generate(
        [make_request("i", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), tok.eos_token_ids)]
    )[0]
    assert len(ignoring.token_ids) == n and ignoring.finish_reason == FinishReason.LENGTH
    assert ignoring.token_ids[: len(short.token_ids)] == short.token_ids  # EOS is kept, then goes on
