"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) over a paged KV cache.

One forward runs the packed batch of a step: every token of every scheduled sequence, prefill
chunks and decode tokens together, as [T, hidden] tensors, so each projection is one matmul for
the whole batch. Q/K/V and gate/up projections are fused into single weights at load time (fewer,
larger matmuls). Arithmetic follows Hugging Face's modeling code step for step (RMSNorm in float32,
rotate-half RoPE, residual order), which is what the greedy-equality tests check. Attention and
the elementwise steps go through the worker's backend (gpu_worker.backends), which may fuse
them: each layer hands on (MLP output, residual) and the next norm adds them, fused or not.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.backends.base import AttentionBackend, rms_norm  # noqa: F401 (rms_norm: the tests read it here)
from gpu_worker.linear import Linear, can_pack
from protocol.model_files.model_config import ModelConfig
from gpu_worker.rope import RotaryEmbedding


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: a missing, unexpected or misshapen tensor."""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
        self.cfg = cfg
        self.input_norm = nn.Parameter(torch.ones(h, **kw), requires_grad=False)
        self.qkv = nn.Parameter(torch.empty(q + 2 * kv, h, **kw), requires_grad=False)
        self.qkv_bias = (
            nn.Parameter(torch.zeros(q + 2 * kv, **kw), requires_grad=False) if cfg.qkv_bias else None
        )
        self.o_proj = nn.Parameter(torch.empty(h, q, **kw), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(h, **kw), requires_grad=False)
        self.gate_up = nn.Parameter(torch.empty(2 * cfg.intermediate_size, h, **kw), requires_grad=False)
        self.down = nn.Parameter(torch.empty(h, cfg.intermediate_size, **kw), requires_grad=False)
        self.scale = cfg.head_dim**-0.5
        self.prepare(pack=False)

    def prepare(self, pack: bool) -> None:
        """Build the matrix-product ops from the (loaded) parameters; see gpu_worker.linear."""
        self.qkv_op = Linear(self.qkv, self.qkv_bias, pack)
        self.o_op = Linear(self.o_proj, None, pack)
        self.gate_up_op = Linear(self.gate_up, None, pack)
        self.down_op = Linear(self.down, None, pack)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rot: Any,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual): their sum is the layer's output, which the next layer's (or
        the final) norm adds up fused with the norm."""
        cfg = self.cfg
        t = x.shape[0]
        if residual is None:
            residual = x
            h = backend.rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        else:
            h, residual = backend.add_rms_norm(x, residual, self.input_norm, cfg.rms_norm_eps)
        qkv = self.qkv_op(h)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = backend.rotary_write_kv(
            q.view(t, cfg.num_attention_heads, cfg.head_dim), k.view(t, cfg.num_key_value_heads, cfg.head_dim),
            v.view(t, cfg.num_key_value_heads, cfg.head_dim), rot, k_cache, v_cache, meta,
        )
        attn = backend.attend(q, k_cache, v_cache, meta, self.scale)
        o = self.o_op(attn.view(t, cfg.q_size))
        h, residual = backend.add_rms_norm(o, residual, self.post_norm, cfg.rms_norm_eps)
        return self.down_op(backend.silu_and_mul(self.gate_up_op(h))), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, **kw), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size, **kw), requires_grad=False)
        self.lm_head = (
            self.embed
            if cfg.tie_word_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, **kw), requires_grad=False)
        )
        self.rope = RotaryEmbedding(cfg, max_positions, device, dtype)
        self.lm_head_op = Linear(self.lm_head, None, pack=False)

    def prepare(self) -> None:
        """Call once the weights are final: packs them for the fastest kernels of the device.

        The dense copies of packed layer weights are released (the tied embedding stays, the
        token lookup needs it), so weights must not be loaded again afterwards.
        """
        pack = can_pack(self.embed.device, self.embed.dtype)
        for layer in self.layers:
            layer.prepare(pack)  # type: ignore[operator]
            if pack:
                for name in ("qkv", "o_proj", "gate_up", "down"):
                    getattr(layer, name).data = torch.empty(0, dtype=self.embed.dtype)
        self.lm_head_op = Linear(self.lm_head, None, pack)

    def linear_ops(self) -> list[Linear]:
        """Every matrix-product op, layer by layer, the LM head last."""
        ops = [op for layer in self.layers for op in (layer.qkv_op, layer.o_op, layer.gate_up_op, layer.down_op)]
        return ops + [self.lm_head_op]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (MLP output, residual), [T, hidden] each: the hidden state is their
        sum, formed (with the final norm) only for the rows that are sampled."""
        x = F.embedding(input_ids, self.embed)
        rot = backend.rotary_inputs(self.rope, meta)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rot, k_cache, v_cache, meta, backend)
        assert residual is not None, "a model has at least one layer"
        return x, residual

    @torch.inference_mode()
    def compute_logits(
        self, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor | None, backend: AttentionBackend
    ) -> torch.Tensor:
        """float32 logits [len(rows), vocab] of the packed rows `rows` (an index on the device),
        or of every row when `rows` is None (a CUDA-graph batch)."""
        if rows is not None:
            x, residual = x.index_select(0, rows), residual.index_select(0, rows)
        h, _ = backend.add_rms_norm(x, residual, self.norm, self.cfg.rms_norm_eps)
        return self.lm_head_op(h).float()

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the fused parameters; every one must be filled."""
        cfg = self.cfg
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        slices = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        pending = set(self._required_checkpoint_names())
        for name, tensor in weights:
            target = self._target(name, slices, inter)
            if target is None:
                continue
            _, param, rows = target
            dest = param if rows is None else param[rows[0] : rows[1]]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise WeightLoadError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}"
                )
            dest.copy_(tensor.to(dest.dtype))
            pending.discard(name)
        if pending:
            raise WeightLoadError(f"checkpoint lacks {len(pending)} tensors, e.g. {sorted(pending)[:3]}")

    def _required_checkpoint_names(self) -> list[str]:
        """Every Hugging Face tensor name the model needs from a checkpoint."""
        cfg = self.cfg
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                      p + "self_attn.o_proj.weight"]
            names += [f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
            names += [f"{p}self_attn.{m}_proj.weight" for m in ("q", "k", "v")]
            if cfg.qkv_bias:
                names += [f"{p}self_attn.{m}_proj.bias" for m in ("q", "k", "v")]
        return names

    def _target(
        self, name: str, slices: dict[str, tuple[int, int]], inter: int
    ) -> tuple[str, torch.Tensor, tuple[int, int] | None] | None:
        if name in ("model.embed_tokens.weight",):
            return "embed", self.embed, None
        if name == "model.norm.weight":
            return "norm", self.norm, None
        if name == "lm_head.weight":
            return None if self.cfg.tie_word_embeddings else ("lm_head", self.lm_head, None)
        if not name.startswith("model.layers.") or "rotary_emb" in name:
            if "rotary_emb" in name:
                return None
            raise WeightLoadError(f"unexpected tensor in checkpoint: {name}")
        rest = name[len("model.layers.") :]
        idx_str, _, sub = rest.partition(".")
        try:
            layer: DecoderLayer = self.layers[int(idx_str)]  # type: ignore[assignment]
        except (ValueError, IndexError) as exc:
            raise WeightLoadError(f"unexpected tensor in checkpoint: {name}") from exc
        p = f"layers.{idx_str}."
        simple = {
            "input_layernorm.weight": ("input_norm", layer.input_norm),
            "post_attention_layernorm.weight": ("post_norm", layer.post_norm),
            "self_attn.o_proj.weight": ("o_proj", layer.o_proj),
            "mlp.down_proj.weight": ("down", layer.down),
        }
        if sub in simple:
            n, param = simple[sub]
            return p + n, param, None
        module, _, kind = sub.rpartition(".")
        proj = module.rpartition(".")[2]
        if proj in slices and kind == "weight":
            return p + "qkv", layer.qkv, slices[proj]
        if proj in slices and kind == "bias" and layer.qkv_bias is not None:
            return p + "qkv_bias", layer.qkv_bias, slices[proj]
        if proj == "gate_proj" and kind == "weight":
            return p + "gate_up", layer.gate_up, (0, inter)
        if proj == "up_proj" and kind == "weight":
            return p + "gate_up", layer.gate_up, (inter, 2 * inter)
        raise WeightLoadError(f"unexpected tensor in checkpoint: {name}")

    def init_dummy_weights(self, seed: int) -> None:
        """Random weights of the right shapes (benchmarks, tests): N(0, 0.02), norms 1, biases 0.

        Drawn on the CPU (the same weights on every machine) for a CPU model; on CUDA drawn on
        the device by its own generator (the same on every CUDA run of one seed, not the CPU's
        values): a CPU draw of 8B numbers took longer than a whole benchmark.
        """
        device = self.embed.device
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif "bias" in name:
                param.zero_()
            elif device.type == "cuda":
                param.normal_(0.0, 0.02, generator=gen)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
