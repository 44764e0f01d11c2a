"""Building the CPU C kernels: cached per source and machine, clear errors without a compiler."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.cpu_kernels import build
from gpu_worker.runner import _decode_kernel
from protocol.config import ConfigError, ModelSettings

needs_cc = pytest.mark.skipif(build.compiler() is None, reason="no C compiler")


@needs_cc
def test_library_is_built_once_and_reused(tmp_path):
    first = build.build_library("paged_decode_attention.c", tmp_path)
    stamp = first.stat().st_mtime_ns
    again = build.build_library("paged_decode_attention.c", tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # no temp files left


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda: None)
    with pytest.raises(build.KernelBuildError, match="no C compiler"):
        build.build_library("paged_decode_attention.c", tmp_path)
    cpu = torch.device("cpu")
    auto = ModelSettings(cache_dir=str(tmp_path))
    assert _decode_kernel(auto, cpu, torch.float32, None) is None  # auto falls back to torch
    with pytest.raises(ConfigError, match="cpu-c: no C compiler"):
        _decode_kernel(ModelSettings(cache_dir=str(tmp_path), attention_backend="cpu-c"), cpu,
                       torch.float32, None)


def test_backend_choice(tmp_path):
    cpu = torch.device("cpu")
    torch_only = ModelSettings(cache_dir=str(tmp_path), attention_backend="torch")
    assert _decode_kernel(torch_only, cpu, torch.float32, None) is None
    assert _decode_kernel(ModelSettings(cache_dir=str(tmp_path)), cpu, torch.float16, None) is None
    with pytest.raises(ConfigError, match="float32/bfloat16"):
        _decode_kernel(ModelSettings(cache_dir=str(tmp_path), attention_backend="cpu-c"), cpu,
                       torch.float16, None)
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        ModelSettings(attention_backend="flash").validate()


@needs_cc
def test_compile_error_names_the_command(tmp_path, monkeypatch):
    (tmp_path / "broken.c").write_text("int f( {")
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    with pytest.raises(build.KernelBuildError, match="failed"):
        build.build_library("broken.c", tmp_path / "cache")
