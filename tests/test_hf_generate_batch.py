"""tests/benchmarks/hf_generate_batch.py, the transformers continuous-batching baseline of issue 8,
run as the GPU benchmark runs it (its own process) on CPU with a tiny random Llama config.

It must generate exactly each request's own length, and when transformers fails requests (its
generation thread hit a fatal error) it must say so instead of reporting a short count as a run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "benchmarks" / "hf_generate_batch.py"
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def run_baseline(tmp_path: Path, prompts: list[list[int]], lens: list[int], *flags: str) -> dict:
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    workload, out = tmp_path / "workload.json", tmp_path / "out.json"
    workload.write_text(json.dumps({"prompts": prompts, "output_lens": lens}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), str(workload), str(out), "--device", "cpu",
                           "--max-batch-tokens", "1024", *flags],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def varied_work(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 512) for _ in range(rng.randint(10, 300))] for _ in range(n)]
    lens = [rng.choice([1, 2, 5, 17, 40, 90, 160, 300]) for _ in range(n)]
    return prompts, lens


@pytest.mark.slow
def test_every_request_gets_exactly_its_own_length(tmp_path: Path):
    prompts, lens = varied_work(20, seed=3)
    report = run_baseline(tmp_path, prompts, lens)
    assert report["asked_tokens"] == sum(lens)
    assert report["output_tokens"] == sum(lens)
    assert report["valid"] is True
    assert report["statuses"] == {"FINISHED": 20}
    assert report["wrong_requests"] == 0 and report["failed_requests"] == 0
    assert report["path"].startswith("ContinuousBatchingManager")
    (attempt,) = report["attempts"]  # CPU: no retry
    assert attempt["thread_errors"] == [] and attempt["timed_out"] is False
    assert report["output_throughput"] > 0


@pytest.mark.slow
def test_requests_failed_by_transformers_make_the_run_invalid(tmp_path: Path):
    """Two 256-token blocks cannot hold a 300 + 300 token request: transformers' thread stops
    with a fatal error and hands back every unfinished request as FAILED (is_finished() true)."""
    prompts, _ = varied_work(6, seed=5)
    prompts[2] = list(range(10, 310))
    lens = [5, 5, 300, 5, 40, 90]
    report = run_baseline(tmp_path, prompts, lens, "--num-blocks", "2")
    assert report["valid"] is False
    assert report["output_tokens"] < report["asked_tokens"] == sum(lens)
    assert report["failed_requests"] >= 1 and report["wrong_requests"] >= report["failed_requests"]
    assert report["statuses"].get("FAILED", 0) == report["failed_requests"]
    (attempt,) = report["attempts"]
    assert any("r2" == w["id"] and w["got"] < 300 for w in attempt["wrong_sample"])
    assert attempt["thread_errors"], "the generation thread's error is recorded"
