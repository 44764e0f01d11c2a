"""Grammar-constrained decoding in the engine: the same outputs whether a request ran alone, in
chunked prefill, or was preempted and recomputed (the matcher is replayed from its outputs)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pdserve.offline_engine import OfflineEngine, make_request
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.messages import FinishReason
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
