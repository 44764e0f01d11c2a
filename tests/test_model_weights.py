"""Loading Hugging Face-named tensors into the fused model: complete, exact, or a clear error."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model import LlamaForCausalLM, WeightLoadError
from protocol.model_files.model_config import ModelConfig

CONFIG = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 12,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
          "tie_word_embeddings": True, "max_position_embeddings": 64}


def checkpoint(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.bias": (kv,), p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter),
        })
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def make() -> tuple[ModelConfig, LlamaForCausalLM]:
    cfg = ModelConfig.from_hf_dict(CONFIG)
    return cfg, LlamaForCausalLM(cfg, torch.float32, torch.device("cpu"), 64)


def test_complete_checkpoint_fills_the_fused_parameters_exactly():
    cfg, model = make()
    ckpt = checkpoint(cfg)
    model.load_weights(ckpt.items())
    layer = model.layers[1]
    q, kv = cfg.q_size, cfg.kv_size
    assert torch.equal(layer.qkv[q : q + kv], ckpt["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(layer.qkv_bias[q + kv :], ckpt["model.layers.1.self_attn.v_proj.bias"])
    assert torch.equal(layer.gate_up[cfg.intermediate_size :], ckpt["model.layers.1.mlp.up_proj.weight"])
    assert model.lm_head is model.embed  # tied


def test_missing_tensor_is_named():
    cfg, model = make()
    ckpt = checkpoint(cfg)
    del ckpt["model.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(WeightLoadError, match=r"lacks 1 tensors.*layers\.1\.self_attn\.v_proj\.bias"):
        model.load_weights(ckpt.items())


def test_wrong_shape_and_unexpected_tensor_are_refused():
    cfg, model = make()
    ckpt = checkpoint(cfg)
    ckpt["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightLoadError, match=r"down_proj\.weight: checkpoint shape \(3, 3\)"):
        model.load_weights(ckpt.items())
    cfg, model = make()
    ckpt = checkpoint(cfg) | {"model.layers.0.mlp.extra.weight": torch.zeros(1)}
    with pytest.raises(WeightLoadError, match="unexpected tensor in checkpoint: model.layers.0.mlp.extra"):
        model.load_weights(ckpt.items())
