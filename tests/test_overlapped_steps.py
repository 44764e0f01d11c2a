"""Overlapped steps (step N+1 launched before N's tokens reach the host) change no output.

On CPU a launch completes the step, but with `overlap_steps="on"` the bookkeeping is the CUDA
one: N's samples enter N+1 as placeholders that the executor fills from N's token tensor. The
engine with overlap must produce exactly what the plain engine produces, for greedy, seeded
random, penalised and grammar-constrained (which force the history to be resolved first),
prompt-logprob and stopped requests, with
chunked prefill and a batch that changes every step.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gpu_worker.inflight import PLACEHOLDER, InFlightStep
from pdserve.offline_engine import OfflineEngine, make_request
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from protocol.structured_output import StructuredOutput

pytestmark = pytest.mark.slow


def _engine(model_dir, overlap: str) -> OfflineEngine:
    return OfflineEngine(
        ModelSettings(model=str(model_dir), overlap_steps=overlap), CacheSettings(num_kv_blocks=256),
        SchedulerSettings(max_num_batched_tokens=48, max_num_seqs=5), check_integrity=True,
    )


def _requests(tok):
    eos = tok.eos_token_ids
    prompts = ["Tell me a story.", "Name three colors.", "Why is the sky blue? Explain it well.",
               "Count to ten.", "What is 2 + 2?", "Write a haiku about rain.", "Say hello.",
               "A word and a number:"]
    params = [
        SamplingParams(max_tokens=20, temperature=0.0),
        SamplingParams(max_tokens=17, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=15, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_tokens=19, temperature=1.0, top_k=20, seed=3, frequency_penalty=0.5),
        SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4, logprobs=2),
        SamplingParams(max_tokens=25, temperature=0.7, min_p=0.05, seed=11),
        SamplingParams(max_tokens=9, temperature=0.0, prompt_logprobs=2),
        SamplingParams(max_tokens=14, temperature=0.9, seed=5,
                       structured=StructuredOutput("regex", "[a-z]+ [0-9]{1,3}!")),
    ]
    return [make_request(f"r{i}", tok.apply_chat_template([{"role": "user", "content": p}]), sp, eos)
            for i, (p, sp) in enumerate(zip(prompts, params))]


def test_overlapped_engine_equals_plain_engine(smollm2_dir, smollm2_tokenizer):
    plain = _engine(smollm2_dir, "off")
    assert not plain.runner.overlap
    expected = plain.generate(_requests(smollm2_tokenizer))
    overlapped = _engine(smollm2_dir, "on")
    assert overlapped.runner.overlap
    got = overlapped.generate(_requests(smollm2_tokenizer))
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids, g.request_id
        assert g.finish_reason == e.finish_reason
        assert [lp.token_ids.tolist() for lp in g.logprobs] == [lp.token_ids.tolist() for lp in e.logprobs]
        assert (g.prompt_logprobs is None) == (e.prompt_logprobs is None)
        if e.prompt_logprobs is not None:  # computed in a prefill step that runs overlapped
            assert g.prompt_logprobs.token_ids.tolist() == e.prompt_logprobs.token_ids.tolist()
    # The worker's sequences hold no placeholder once everything is finished and forgotten.
    assert overlapped.runner.seqs.seqs == {}
    assert all(len(c.token_ids) > 0 for c in got)
    text = smollm2_tokenizer.decode(got[-1].token_ids)
    assert re.fullmatch("[a-z]+ [0-9]{1,3}!", text), text


def test_feed_maps_placeholders_to_the_previous_steps_rows():
    step = InFlightStep(
        step_id=3, states=[], slots=[], tokens=torch.tensor([101, 202, 303]), host_tokens=torch.zeros(3),
        host_logprobs=None, done=None, timer=None, launched_at=0.0,
        rows_by_request={"a": 0, "b": 1, "c": 2},
    )
    # Three sequences packed: "x" (a 3-token prefill, no placeholder), "c" and "a" (decodes).
    input_ids = np.array([5, 6, 7, PLACEHOLDER, PLACEHOLDER])
    query_start = np.array([0, 3, 4, 5])
    fed = step.feed(input_ids, query_start, ["x", "c", "a"], torch.device("cpu"))
    assert fed is not None
    assert fed.rows.tolist() == [3, 4]
    assert fed.values.tolist() == [303, 101]
    assert step.feed(np.array([1, 2]), np.array([0, 1, 2]), ["x", "y"], torch.device("cpu")) is None
    with pytest.raises(ValueError, match="not a sample of step 3"):
        step.feed(np.array([PLACEHOLDER]), np.array([0, 1]), ["zzz"], torch.device("cpu"))
