"""Greedy equality with transformers on tiny random models of each supported family.

Each config is built here (random weights, saved as safetensors) to exercise what SmolLM2 does
not: Qwen2's QKV bias, Llama 3's rope scaling and untied lm_head, Mistral's sliding window.
Weights are drawn with a larger std than the default so logits are spread out and a greedy tie
from float noise is practically impossible.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from pdserve.offline_engine import OfflineEngine, make_request

COMMON = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.25, bos_token_id=1, eos_token_id=2,
)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "qwen2-bias": Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=10000.0),
        "llama3-rope-scaling": LlamaConfig(
            **COMMON, tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "mistral-sliding-window": MistralConfig(**COMMON, sliding_window=24, tie_word_embeddings=False),
    }


def _build(name: str, out: Path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    cfg = _configs()[name]
    cfg._attn_implementation = "eager"  # the reference honours sliding windows exactly
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    if cfg.model_type == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.mark.parametrize("name", ["qwen2-bias", "llama3-rope-scaling", "mistral-sliding-window"])
def test_tiny_random_model_matches_transformers(name: str, tmp_path: Path):
    model = _build(name, tmp_path)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (5, 17, 33, 48)]
    max_new = 40  # positions reach ~88: past the sliding window and the rope scaling's 32
    refs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, min_new_tokens=max_new,
                do_sample=False,
            )
        refs.append(y[0, len(ids) :].tolist())

    engine = OfflineEngine(
        ModelSettings(model=str(tmp_path)), CacheSettings(num_kv_blocks=64, block_size=8),
        SchedulerSettings(max_num_batched_tokens=24), check_integrity=True,
    )
    params = SamplingParams(max_tokens=max_new, min_tokens=max_new, temperature=0.0)
    out = engine.generate([make_request(f"r{i}", p, params, [2]) for i, p in enumerate(prompts)])
    assert [c.token_ids for c in out] == refs
    assert len({tuple(r) for r in refs}) == len(refs)  # the model is not degenerate


def test_dummy_weights_need_only_a_config(tmp_path: Path):
    """--load-format dummy runs any config without weights (how benchmarks use real shapes)."""
    _configs()["llama3-rope-scaling"].to_json_file(tmp_path / "config.json")
    engine = OfflineEngine(
        ModelSettings(model=str(tmp_path), load_format="dummy", seed=3),
        CacheSettings(num_kv_blocks=32, block_size=8), SchedulerSettings(), check_integrity=True,
    )
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.0)
    a = engine.generate([make_request("a", [5, 6, 7, 8], params, [2])])[0].token_ids
    b = engine.generate([make_request("b", [5, 6, 7, 8], params, [2])])[0].token_ids
    assert len(a) == 6 and a == b and all(0 <= t < 384 for t in a)
