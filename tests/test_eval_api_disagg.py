"""Prompt logprobs with disaggregation: the prefill worker scores the prompt in its prefill
chunks, the KV moves, the decode worker continues; the numbers still match transformers."""

from __future__ import annotations

import re
import time

import httpx
import pytest
import torch

from tests.service_fixture import start_server
from tests.test_eval_api_service import MODEL, PROMPTS, hf_logprobs, hf_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    srv = start_server(smollm2_dir, tmp_path_factory.mktemp("disagg-echo"), "--served-model-name", MODEL,
                       "--prefill-workers", "1", "--decode-workers", "1", "--max-local-prefill-tokens", "0",
                       "--block-size", "4", "--max-num-batched-tokens", "16")
    deadline = time.monotonic() + 120  # /ready needs one model worker: wait for both
    while time.monotonic() < deadline:
        ready = {w["id"] for w in httpx.get(f"{srv.url}/workers").json() if w["state"] == "ready"}
        if {"prefill-0", "decode-0"} <= ready:
            break
        time.sleep(0.5)
    yield srv
    srv.stop()


def transfers_ok(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(v) for v in re.findall(r'^pdserve:kv_transfers_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', text, re.M))


def test_echo_logprobs_from_the_prefill_worker(server, hf_model, smollm2_tokenizer):  # noqa: F811
    before = transfers_ok(server)
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    body = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompts, "echo": True, "logprobs": 0, "max_tokens": 4,
        "temperature": 0, "ignore_eos": True}).json()
    for choice, ids in zip(body["choices"], prompts):
        lp = choice["logprobs"]["token_logprobs"]
        assert len(lp) == len(ids) + 4 and lp[0] is None
        want = hf_logprobs(hf_model, ids)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
        assert float((torch.tensor(lp[1 : len(ids)]) - want).abs().max()) <= 1e-3
    deadline = time.monotonic() + 5  # stats reach the gateway twice a second
    while transfers_ok(server) < before + len(prompts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert transfers_ok(server) >= before + len(prompts)  # each went prefill worker -> decode worker
