"""Model directories for benchmarks with dummy weights: a real config.json and a synthetic tokenizer.

    python tests/benchmarks/synthetic_model.py llama-3.1-8b OUT_DIR

No hub is reachable, and the bundled GGUF is too big to carry to the GPU machine, so benchmarks
run real shapes (`--load-format dummy`) with a word-level tokenizer that covers the whole
vocabulary: token i is the word "w{i}", so a prompt of N words is N tokens and any sampled id
decodes. Its chat template joins the messages' contents.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIGS: dict[str, dict] = {
    # Llama-3.1-8B's published config.json (architecture fields only).
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    },
    # SmolLM2-135M's shapes.
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
}


BYTE_IDS = 1000


def write_model_dir(name: str, out: Path, byte_level: bool = False) -> Path:
    """`byte_level`: ids BYTE_IDS.. +255 are the 256 bytes (a byte-level BPE without merges, the rest
    "w{i}" fillers), so any text, JSON included, has tokens: what grammar-constrained decoding
    needs (tests/benchmarks/bench_structured.py). Otherwise the word-level tokenizer above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = CONFIGS[name]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": eos}))
    if byte_level:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # at BYTE_IDS: clear of BOS/EOS ids
        vocab = {f"w{i}": i for i in range(config["vocab_size"]) if not BYTE_IDS <= i < BYTE_IDS + 256}
        vocab.update({c: BYTE_IDS + i for i, c in enumerate(alphabet)})
        raw = Tokenizer(models.BPE(vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
    else:
        vocab = {f"w{i}": i for i in range(config["vocab_size"])}
        raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    first_eos = eos[0] if isinstance(eos, list) else eos
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=f"w{first_eos}",
                                  unk_token=None if byte_level else "w0")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in CONFIGS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(CONFIGS)}}} OUT_DIR")
    print(write_model_dir(sys.argv[1], Path(sys.argv[2])))
