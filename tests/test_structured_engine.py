"""Grammar-constrained decoding in the engine: the same outputs whether a request ran alone, in
chunked prefill, or was preempted and recomputed (the matcher is replayed from its outputs); a
grammar that fails in the worker ends its own request with an error and nothing else."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pdserve.offline_engine import OfflineEngine, make_request
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.messages import FinishReason, NewSeq, StepPlan
from protocol.sampling import SamplingParams
from protocol.structured_output import StructuredOutput, json_schema_output

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    "cast": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4}},
    "required": ["title", "year", "cast"], "additionalProperties": False}
TOPICS = ["a film about space", "a comedy", "a detective story"]


def _requests(tok, tag: str):
    reqs = []
    for i, topic in enumerate(TOPICS):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Describe {topic} as JSON."}])
        params = SamplingParams(max_tokens=120, temperature=0.8, seed=100 + i,
                                structured=json_schema_output(SCHEMA))
        reqs.append(make_request(f"{tag}{i}", prompt, params, tok.eos_token_ids))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Pick a colour."}])
    choice = StructuredOutput("choice", json.dumps(["crimson red", "navy blue", "forest green"]))
    reqs.append(make_request(f"{tag}c", prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=9,
                                                              structured=choice), tok.eos_token_ids))
    return reqs


def _engine(smollm2_dir, blocks: int, batched: int) -> OfflineEngine:
    return OfflineEngine(ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=blocks),
                         SchedulerSettings(max_num_batched_tokens=batched), check_integrity=True)


def test_outputs_survive_chunked_prefill_and_preemption(smollm2_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    roomy = _engine(smollm2_dir, blocks=512, batched=2048)
    reference = [c.token_ids for c in roomy.generate(_requests(tok, "a"))]
    del roomy
    # 14 blocks of 16 tokens cannot hold the batch: requests are preempted and recomputed;
    # 32-token steps split every prompt into chunks.
    tight = _engine(smollm2_dir, blocks=14, batched=32)
    out = tight.generate(_requests(tok, "b"))
    assert tight.scheduler.num_preemptions > 0
    assert [c.token_ids for c in out] == reference
    for c in out[:-1]:
        assert c.finish_reason == FinishReason.STOP
        jsonschema.validate(json.loads(tok.decode(c.token_ids)), SCHEMA)
    assert tok.decode(out[-1].token_ids) in ("crimson red", "navy blue", "forest green")


def test_a_grammar_failing_in_the_worker_ends_its_request_with_an_error_and_spares_the_batch(
        smollm2_dir, smollm2_tokenizer):
    """The tokenizer stage rejects such grammars with a 400 in the service; the offline engine
    has no tokenizer stage, so they reach the worker, which is the defence in depth tested here."""
    tok = smollm2_tokenizer
    engine = _engine(smollm2_dir, blocks=512, batched=2048)
    reference = [c.token_ids for c in engine.generate(_requests(tok, "a")[-2:])]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    bad = [make_request(f"bad{i}", prompt, SamplingParams(max_tokens=20, structured=StructuredOutput(
        "grammar", grammar)), tok.eos_token_ids) for i, grammar in enumerate(
        ["start: <|no_such_token|>", 'start: "a" <[99999]>'])]
    out = engine.generate(bad[:1] + _requests(tok, "b")[-2:] + bad[1:])
    for c, words in ((out[0], "unknown special token"), (out[-1], "Token range end too large")):
        assert c.finish_reason == FinishReason.ERROR and c.token_ids == []  # never empty + "stop"
        assert words in c.error and "cannot be compiled" in c.error
    assert [c.token_ids for c in out[1:-1]] == reference  # the rest of the batch as if alone
    assert all(c.finish_reason == FinishReason.STOP for c in out[1:-1])
    # A matcher that fails mid-output: a resumed sequence whose outputs the grammar refuses.
    letters = tok.hf_tokenizer.encode("abc", add_special_tokens=False)
    digits = SamplingParams(max_tokens=20, structured=StructuredOutput("regex", "[0-9]+"))
    seqs = [NewSeq(rid, prompt + outs, len(prompt), [1 + 8 * i + b for b in range(8)], 0,
                   len(prompt) + len(outs), digits, tok.eos_token_ids, 0)
            for i, (rid, outs) in enumerate((("mismatch", letters), ("fine", [])))]
    result = engine.runner.execute(StepPlan(step_id=10_000, new_seqs=seqs))
    assert list(result.request_errors) == ["mismatch"]
    assert "does not match the grammar" in result.request_errors["mismatch"]
    assert tok.decode(result.sampled_token_ids[1:].tolist()).isdigit()
    engine.runner.execute(StepPlan(step_id=10_001, finished_request_ids=["mismatch", "fine"]))
