"""One-time conversion of a llama.cpp GGUF file into a Hugging Face model directory.

Reading a GGUF through transformers takes ~20 s per start (dequantize + tokenizer rebuild), so
we convert once into a cache directory (float32 model.safetensors, config.json,
generation_config.json, tokenizer files) and load that directory afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# llama.cpp per-layer tensor stem -> Hugging Face per-layer module path.
_LAYER_TENSOR_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_GLOBAL_TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (e.g. ``blk.3.attn_q.weight``) to its Hugging Face name."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias") or not stem:
        raise ValueError(f"unexpected GGUF tensor name {gguf_name!r}")
    if stem in _GLOBAL_TENSOR_NAMES:
        return f"{_GLOBAL_TENSOR_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSOR_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSOR_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama/Qwen2 equivalent")


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleaving of a Llama q/k projection (weight or bias).

    llama.cpp's converter regroups each head's rows from HF's "half split" rotary layout into
    interleaved pairs: rows viewed as (n_head, 2, head_dim/2) get their last two axes swapped.
    Viewing as (n_head, head_dim/2, 2) and swapping back restores the HF order exactly.
    """
    rows = weights.shape[0]
    if rows % (2 * n_head) != 0:
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads")
    half = rows // n_head // 2
    grouped = weights.reshape(n_head, half, 2, *weights.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(weights.shape))


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _required(reader: gguf.GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return value


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict[str, Any] | None:
    """HF rope_scaling from GGUF rope.scaling.* keys; None when the model uses plain RoPE."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = float(factor)
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def build_hf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Hugging Face config.json contents derived from the GGUF metadata and tensor list."""
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF uses llama3-style rope_freqs scaling, which this converter does not support")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight tensor")

    hidden_size = int(_required(reader, f"{arch}.embedding_length"))
    num_heads = int(_required(reader, f"{arch}.attention.head_count"))
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", num_heads)
    if not isinstance(num_kv_heads, int):
        raise ValueError("GGUF has per-layer key/value head counts, which are not supported")
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden_size // num_heads))

    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "hidden_size": hidden_size,
        "intermediate_size": int(_required(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_required(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_required(reader, f"{arch}.context_length")),
        # The embedding's row count is what the weights need; metadata vocab_size may be absent.
        "vocab_size": int(embed.shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding", "pad")] = int(value)
    scaling = _rope_scaling(reader, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def dequantized_state_dict(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """float32 tensors under Hugging Face names, with Llama q/k rows back in HF order."""
    unpermute = config["model_type"] == "llama"
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF tensors", unit="tensor", file=sys.stderr):
        if tensor.name == "rope_freqs.weight":
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        layer_stem = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if unpermute and layer_stem in heads:
            weights = unpermute_qk(weights, heads[layer_stem])
        tensors[hf_tensor_name(tensor.name)] = np.array(weights, dtype=np.float32, order="C")
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer  # heavy import, only needed while converting

    print(f"pdserve: building tokenizer from {gguf_path.name} (a few seconds)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))


def convert_gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Convert ``gguf_path`` into a Hugging Face directory at ``out_dir`` and return ``out_dir``.

    Everything is written into a temporary sibling directory that is renamed into place at the
    end, so a crash never leaves a half-written ``out_dir``. An existing ``out_dir`` is replaced.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    config = build_hf_config(reader)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = dequantized_state_dict(reader, config)
        save_file(tensors, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_json(tmp_dir / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        _write_json(tmp_dir / "generation_config.json", generation)
        _write_tokenizer(gguf_path, tmp_dir)
        _make_readable(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _make_readable(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; a cache should read like any download."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``out_dir``; a directory rename cannot replace a non-empty one,
    so an existing ``out_dir`` is first renamed aside and removed afterwards."""
    old_dir: Path | None = None
    if out_dir.exists():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


if __name__ == "__main__":  # `python -m protocol.model_files.gguf_convert GGUF OUT_DIR` (model_source)
    if len(sys.argv) != 3:
        sys.exit("usage: python -m protocol.model_files.gguf_convert GGUF_FILE OUT_DIR")
    convert_gguf_to_hf_dir(Path(sys.argv[1]), Path(sys.argv[2]))
