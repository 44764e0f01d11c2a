"""--attention-backend: which backend a worker gets on which device (no model needed)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.backends import select
from gpu_worker.backends.torch_backend import TorchBackend
from protocol.config import ConfigError, ModelSettings
from protocol.model_files.model_config import ModelConfig

CFG = ModelConfig.from_hf_dict({
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
})
CPU = torch.device("cpu")


def test_cpu_auto_is_the_c_kernel_or_torch_as_before(tmp_path, monkeypatch):
    auto = ModelSettings(cache_dir=str(tmp_path))
    monkeypatch.setattr(select, "decode_kernel", lambda *a: None)  # no C compiler
    backend = select.select_backend(auto, CFG, CPU, torch.float32)
    assert isinstance(backend, TorchBackend) and backend.name == "torch" and backend.heads_per_kv == 2
    sentinel = object()
    monkeypatch.setattr(select, "decode_kernel", lambda *a: sentinel)
    backend = select.select_backend(auto, CFG, CPU, torch.float32)
    assert backend.name == "cpu-c" and backend.decode_kernel is sentinel
    assert not backend.supports_cuda_graphs


def test_triton_on_cpu_needs_the_interpreter(tmp_path, monkeypatch):
    settings = ModelSettings(cache_dir=str(tmp_path), attention_backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="triton runs on CUDA"):
        select.select_backend(settings, CFG, CPU, torch.float32)


def test_cuda_auto_prefers_triton_and_falls_back_to_torch(tmp_path, monkeypatch):
    """The choice alone (no CUDA here): auto on a CUDA device asks whether triton imports."""
    auto = ModelSettings(cache_dir=str(tmp_path))
    cuda = torch.device("cuda")
    monkeypatch.setattr(select, "triton_available", lambda: False)
    backend = select.select_backend(auto, CFG, cuda, torch.bfloat16)
    assert backend.name == "torch" and backend.decode_kernel is None
    with pytest.raises(ConfigError, match="triton is not installed"):
        select.select_backend(ModelSettings(attention_backend="triton"), CFG, cuda, torch.bfloat16)


def test_settings_accept_triton_and_enforce_eager():
    ModelSettings(attention_backend="triton", enforce_eager=True).validate()
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        ModelSettings(attention_backend="tensorrt").validate()
