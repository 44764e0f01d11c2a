"""The architecture facts the runner needs, read from a Hugging Face config.json.

One struct for the whole Llama family (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2): they differ only
in QKV bias, rope scaling, tied embeddings and sliding windows, which are fields here rather than
subclasses. Both the old (`rope_theta` + `rope_scaling`) and the transformers-5 (`rope_parameters`)
spellings of the rope settings are understood.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The config describes an architecture or feature the runner does not implement."""


class RopeScaling(msgspec.Struct, frozen=True):
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, hf_dir: Path) -> ModelConfig:
        path = Path(hf_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UnsupportedModelError(f"cannot read {path}: {exc}") from exc
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; pdserve runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = int(data["num_attention_heads"])
        hidden = int(data["hidden_size"])
        rope_theta, scaling = _rope_settings(data)
        sliding = data.get("sliding_window")
        if model_type == "qwen2" and not data.get("use_sliding_window", False):
            sliding = None
        eos = data.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(data["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(data.get("attention_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=data.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(data.get("torch_dtype") or data.get("dtype") or "float32"),
        )


def _rope_settings(data: dict[str, Any]) -> tuple[float, RopeScaling]:
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", data.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"rope scaling {rope_type!r} is not supported")
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", 8192)
        ),
    )
