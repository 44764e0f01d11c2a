"""The Triton backend against the torch backend, whole model on the CPU through Triton's interpreter.

A tiny random Llama (and a Qwen2 with biases and a sliding window) runs the same steps through
both backends: logits and the KV cache agree to float32 rounding, and the offline engine's
greedy tokens are the same with chunked prefill, prefix hits and decode steps mixed. The CUDA
graphs are not exercised here (no CUDA); tests/test_step_inputs.py covers their host side and
tests/benchmarks/gpu_backend_check.py checks them on the device.

TRITON_INTERPRET is set while this module imports the kernels and while its tests run, and put
back otherwise, as in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

_PRIOR = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    from gpu_worker.backends.triton_backend import TritonBackend
finally:
    if _PRIOR is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PRIOR

from gpu_worker.backends.executor import EagerExecutor  # noqa: E402
from gpu_worker.backends.torch_backend import TorchBackend  # noqa: E402
from gpu_worker.kv_cache import allocate_kv_cache  # noqa: E402
from gpu_worker.model import LlamaForCausalLM  # noqa: E402
from gpu_worker.step_inputs import step_inputs_from_arrays  # noqa: E402
from pdserve.offline_engine import OfflineEngine, make_request  # noqa: E402
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings  # noqa: E402
from protocol.model_files.model_config import ModelConfig  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

CPU = torch.device("cpu")
BS = 4
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 200, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
QWEN2 = LLAMA | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": 8,
                 "use_sliding_window": True, "sliding_window": 12, "tie_word_embeddings": True}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def tiny_model(config: dict) -> tuple[ModelConfig, LlamaForCausalLM]:
    cfg = ModelConfig.from_hf_dict(config)
    model = LlamaForCausalLM(cfg, torch.float32, CPU, 256)
    model.init_dummy_weights(3)
    with torch.no_grad():  # larger than N(0, 0.02), so attention is far from uniform
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(10)
    model.prepare()
    return cfg, model


@pytest.mark.parametrize("config", [LLAMA, QWEN2], ids=["llama", "qwen2-window"])
def test_triton_backend_matches_torch_backend(config: dict) -> None:
    cfg, model = tiny_model(config)
    rng = np.random.default_rng(0)
    executors, caches = [], []
    for backend in (TorchBackend(CPU, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.sliding_window),
                    TritonBackend(CPU, cfg.num_key_value_heads, cfg.sliding_window, cfg.num_attention_heads)):
        cache, per_layer = allocate_kv_cache(cfg, 40, BS, CPU, torch.float32)
        executors.append(EagerExecutor(model, backend, per_layer, CPU))
        caches.append(cache)
    tables = np.array([[5, 9, 2, 30, 31, 32], [7, 1, 12, 33, 34, 35], [20, 21, 22, 23, 24, 25]], dtype=np.int64)
    # (already computed, scheduled now) per sequence: prompts, then a mixed step (a decode, a
    # chunk after a cached prefix, a new prompt), then decode-only steps
    steps = [[(0, 9), (0, 5)], [(9, 1), (5, 6), (0, 17)], [(10, 1), (11, 1), (17, 1)], [(11, 1), (12, 1), (18, 1)]]
    for plan in steps:
        done = np.array([c for c, _ in plan], dtype=np.int64)
        now = np.array([n for _, n in plan], dtype=np.int64)
        ids = rng.integers(0, cfg.vocab_size, int(now.sum()))
        step = step_inputs_from_arrays(ids, done, now, tables[: len(plan)], BS, np.arange(len(plan)))
        torch_logits, triton_logits = (e.forward(step) for e in executors)
        assert triton_logits.shape == (len(plan), cfg.vocab_size)
        assert torch_logits.std() > 1.0  # far from a flat distribution
        torch.testing.assert_close(triton_logits, torch_logits, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(caches[1], caches[0], atol=1e-5, rtol=1e-5)


def test_engine_greedy_tokens_equal_across_backends(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA | {"eos_token_id": 1}))
    rng = np.random.default_rng(1)
    shared = rng.integers(2, 200, 12).tolist()
    prompts = [shared + rng.integers(2, 200, n).tolist() for n in (3, 9)] + [rng.integers(2, 200, 7).tolist()]
    greedy = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.0)
    tokens = {}
    for backend in ("torch", "triton"):
        engine = OfflineEngine(
            ModelSettings(model=str(tmp_path), load_format="dummy", device="cpu", dtype="float32",
                          attention_backend=backend, seed=5),
            CacheSettings(block_size=BS, num_kv_blocks=64),
            SchedulerSettings(max_num_batched_tokens=16, max_num_seqs=4),  # chunked prefill
        )
        assert engine.runner.backend.name == backend
        first = engine.generate([make_request("first", prompts[0], greedy, [1])])
        rest = engine.generate([make_request(f"r{i}", p, greedy, [1]) for i, p in enumerate(prompts[1:])])
        assert rest[0].num_cached_tokens >= 8  # the shared prefix came from the cache
        tokens[backend] = [c.token_ids for c in first + rest]
    assert all(len(t) == 6 for t in tokens["torch"])
    assert tokens["triton"] == tokens["torch"]
