"""Evaluation-harness and dashboard features against a real `pdserve up` (every stage a process).

One server for the module, with `--metrics-prefix vllm`: completions `echo` with prompt
logprobs checked against transformers in float32, `prompt_logprobs` on both endpoints, echo with
max_tokens 0, seeded choices (seed + index), `models.retrieve`, vLLM's metric names, and
lm-evaluation-harness's `local-completions` running a loglikelihood task on local data, its
numbers compared with transformers on the same model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.service_fixture import MODEL, module_server

pytestmark = pytest.mark.slow
server = module_server("srv", "--metrics-prefix", "vllm", "--block-size", "4",
                       "--max-num-batched-tokens", "16")


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Row t: the log-softmax that predicts token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from his tractor.",
    "Paris is the capital of",
]


def test_echo_logprobs_match_transformers(server, hf_model, smollm2_tokenizer):
    """What lm-evaluation-harness sends: token ids, echo, logprobs 1, max_tokens 1. The prompts
    are longer than the step budget, so they are prefilled in several chunks."""
    prompts = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    body = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, "seed": 1234}).json()
    worst = 0.0
    for choice, ids in zip(body["choices"], prompts):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(smollm2_tokenizer.decode(ids))
        ref = hf_logprobs(hf_model, ids)
        want = ref[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
        got = torch.tensor(lp["token_logprobs"][1:-1])
        worst = max(worst, float((got - want).abs().max()))
        for row, top in enumerate(lp["top_logprobs"][1:-1]):  # the token, and the best one
            best = smollm2_tokenizer.decode([int(ref[row].argmax())])
            assert abs(top[best] - float(ref[row].max())) <= 1e-3
        assert abs(lp["token_logprobs"][-1] - float(ref[-1].max())) <= 1e-3  # greedy output token
    assert worst <= 1e-3, worst


def test_echo_string_prompt_stream_and_max_tokens_zero(server, client):
    prompt = "Once upon a time"
    whole = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0)
    assert whole.choices[0].text == prompt and whole.usage.completion_tokens == 0
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=4,
                                            temperature=0, logprobs=0, stream=True))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == prompt + plain.choices[0].text


def test_prompt_logprobs_field_on_both_endpoints(server, smollm2_tokenizer):
    prompt = "Water boils at one hundred degrees"
    ids = smollm2_tokenizer.encode(prompt)
    comp = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 2, "prompt_logprobs": 2}).json()
    field = comp["choices"][0]["prompt_logprobs"]
    assert field[0] is None and len(field) == len(ids)
    for entry, token in zip(field[1:], ids[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert sorted(v["rank"] for k, v in entry.items() if k != str(token))[:2] == [1, 2] or \
            entry[str(token)]["rank"] <= 2
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "prompt_logprobs": 0}).json()
    chat_field = chat["prompt_logprobs"]
    assert chat_field[0] is None and len(chat_field) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat_field[1:])
    streamed = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "stream": True, "prompt_logprobs": 1})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


def test_seeded_choices_are_distinct_and_seed_plus_index(server, client):
    kw = dict(model=MODEL, prompt="My favourite colour is", max_tokens=12, temperature=1.0)
    two = client.completions.create(n=2, seed=41, **kw)
    texts = [c.text for c in sorted(two.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]
    assert client.completions.create(seed=41, **kw).choices[0].text == texts[0]
    assert client.completions.create(seed=42, **kw).choices[0].text == texts[1]


def test_models_retrieve(server, client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


VLLM_SERIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
    "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_count",
    "vllm:request_inference_time_seconds_count", "vllm:request_time_per_output_token_seconds_count",
    "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
    "vllm:iteration_tokens_total_count", "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info",
    "vllm:time_per_output_token_seconds_count", "vllm:request_params_n_count",
    "vllm:request_params_max_tokens_count", "vllm:request_max_num_generation_tokens_count",
]
MOVING = [name for name in VLLM_SERIES if name.endswith(("_count", "_total")) and "preemptions" not in name]


def scrape(server) -> dict[str, float]:
    """Each series name -> the sum over its label sets."""
    values: dict[str, float] = {}
    for m in re.finditer(r"^([a-zA-Z0-9_:]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", httpx.get(f"{server.url}/metrics").text, re.M):
        assert m.group(2) is None or 'engine="0"' in m.group(2), m.group(0)
        values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def test_vllm_metric_names_exist_and_move(server, client):
    before = scrape(server)
    assert not any(name.startswith("pdserve:") for name in before)
    # twice the same long prompt: the second finds the first's blocks in the prefix cache
    prompt = "Tell me a story about a dragon who learned to bake bread in a small village. " * 2
    for _ in range(2):
        list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the scheduler publishes its stats twice a second
        after = scrape(server)
        if all(after.get(n, 0) > before.get(n, 0) for n in MOVING):
            break
        time.sleep(0.3)
    for name in VLLM_SERIES:
        assert name in after, name
    stuck = [n for n in MOVING if not after[n] > before.get(n, 0)]
    assert not stuck, stuck
    info = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'^vllm:cache_config_info\{.*block_size="4".*num_gpu_blocks="\d+".*\} 1\.0$', info, re.M)


TASK_YAML = """\
task: pdserve_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "a banana"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven"], "answer": 0},
    {"question": "On a clear day the sky is", "choices": ["green", "blue", "loud"], "answer": 1},
]


def hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """As lm-evaluation-harness's HF models score a pair: encode the whole, split at the
    context's length; the continuation's summed logprob and whether greedy decoding gives it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    lp = hf_logprobs(model, whole)[len(ctx) - 1 : -1]
    target = torch.tensor(whole[len(ctx):])
    return float(lp.gather(1, target.unsqueeze(1)).sum()), bool((lp.argmax(-1) == target).all())


def test_lm_eval_local_completions_matches_transformers(server, smollm2_dir, smollm2_tokenizer, hf_model,
                                                        tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "out"
    args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={smollm2_dir},"
            "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
         "--tasks", "pdserve_tiny_mc", "--include_path", str(tmp_path), "--output_path", str(out),
         "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [samples_file] = out.rglob("samples_pdserve_tiny_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    for sample in samples:
        pairs = [a for _, a in sorted(sample["arguments"].items())]
        scores = []
        for pair, ((loglik, greedy),) in zip(pairs, sample["resps"]):
            ref, ref_greedy = hf_loglikelihood(hf_model, smollm2_tokenizer.hf_tokenizer,
                                               pair["arg_0"], pair["arg_1"])
            assert abs(float(loglik) - ref) <= 1e-3, (pair, loglik, ref)
            assert (greedy == "True") == ref_greedy
            scores.append(ref)
        assert sample["acc"] == float(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"])
