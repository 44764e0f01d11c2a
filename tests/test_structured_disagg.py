"""Structured output across disaggregation: the prefill worker samples the first token under the
grammar, the decode worker rebuilds the matcher from the tokens and continues; the result is the
colocated engine's, token for token."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from pdserve.offline_engine import OfflineEngine, make_request
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from protocol.structured_output import json_schema_output
from tests.service_fixture import start_server

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "days": {"type": "array", "items": {"type": "object", "properties": {
        "day": {"enum": ["mon", "tue", "wed"]}, "high": {"type": "integer"}},
        "required": ["day", "high"], "additionalProperties": False}, "minItems": 2, "maxItems": 2}},
    "required": ["city", "days"], "additionalProperties": False}
QUESTIONS = ["Give a two-day weather forecast for Rome.", "Forecast two days of weather in Oslo."]


def test_prefill_and_decode_workers_share_one_grammar(smollm2_dir, smollm2_tokenizer, tmp_path):
    offline = OfflineEngine(ModelSettings(model=str(smollm2_dir)), CacheSettings(num_kv_blocks=256),
                            SchedulerSettings())
    tok = smollm2_tokenizer
    params = SamplingParams(max_tokens=100, temperature=0.0, structured=json_schema_output(SCHEMA))
    expected = [tok.decode(c.token_ids) for c in offline.generate([
        make_request(f"q{i}", tok.apply_chat_template([{"role": "user", "content": q}]), params,
                     tok.eos_token_ids) for i, q in enumerate(QUESTIONS)])]
    del offline
    srv = start_server(smollm2_dir, tmp_path, "--served-model-name", MODEL, "--prefill-workers", "1",
                       "--decode-workers", "1", "--max-local-prefill-tokens", "0")
    try:
        deadline = time.monotonic() + 60  # /ready needs one worker: a prompt sent before the decode
        while time.monotonic() < deadline and {"prefill", "decode"} - {  # worker registers runs whole
                w["role"] for w in httpx.get(f"{srv.url}/workers").json() if w["state"] == "ready"}:
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        for question, want in zip(QUESTIONS, expected):
            resp = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=100,
                temperature=0, response_format={"type": "json_schema", "json_schema": {
                    "name": "forecast", "schema": SCHEMA}})
            text = resp.choices[0].message.content
            assert text == want
            jsonschema.validate(json.loads(text), SCHEMA)
        deadline = time.monotonic() + 10  # /workers shows the scheduler's stats, sent every 0.5 s
        while True:  # both decoded on the other worker:
            workers = {w["role"]: w for w in httpx.get(f"{srv.url}/workers").json()}
            if workers["decode"]["transfers_done"] >= len(QUESTIONS) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert workers["decode"]["transfers_done"] >= len(QUESTIONS)
    finally:
        srv.stop()
