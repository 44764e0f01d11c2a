"""The backend contract: what the shared Llama model asks of an attention/kernel backend.

A backend is chosen once per worker (`--attention-backend`) and serves every layer of every step:

- `prepare(step) -> metadata`: once per step, the generic StepInputs (numpy) become whatever the
  backend's kernels read (device index tensors, SDPA groups, a C kernel's batch). The metadata is
  opaque to the model, which only hands it back to the backend's own calls.
- per layer: `write_kv` (this step's keys and values into their cache slots) and `attend`
  (queries against the paged cache), plus the elementwise pieces a backend may fuse:
  `rms_norm`, `add_rms_norm`, `rotary` (with `write_kv`: `rotary_write_kv`), `silu_and_mul`. Their defaults here are the plain torch
  arithmetic that follows Hugging Face step for step (what the CPU tests check bit for bit).

The model (gpu_worker.model) and the step executor (gpu_worker.backends.executor) are shared; a
backend holds no per-sequence state. A TensorRT engine would not be a layer backend: it would
implement the step-level contract instead (`StepExecutor.forward(step) -> logits`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from gpu_worker.rope import RotaryEmbedding, apply_rotary
from gpu_worker.step_inputs import StepInputs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class AttentionBackend(ABC):
    name: str = ""
    # True when the backend's per-step metadata lives in fixed device buffers a CUDA graph
    # can capture (gpu_worker.backends.cuda_graphs); False for everything host-shaped.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def prepare(self, step: StepInputs) -> Any:
        """The step's metadata on the backend's device (built once, shared by every layer)."""

    @abstractmethod
    def positions(self, meta: Any) -> torch.Tensor:
        """The packed tokens' positions on the device (int64 [T])."""

    @abstractmethod
    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, meta: Any) -> None:
        """k, v: [T, kv_heads, D] (may be strided views) into the cache slots of the step."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
               scale: float) -> torch.Tensor:
        """q: [T, heads, D] (may be a strided view) -> [T, heads, D] contiguous."""

    # ---------------------------------------------------------------- elementwise (torch)

    def rotary_inputs(self, rope: RotaryEmbedding, meta: Any) -> Any:
        """What `rotary` needs, looked up once per step: here cos/sin [T, 1, D] per token."""
        return rope.lookup(self.positions(meta))

    def rotary(self, q: torch.Tensor, k: torch.Tensor, rot: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rot
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def rotary_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rot: Any,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any) -> torch.Tensor:
        """Rotate q and k, write the rotated k and v into the step's cache slots; the rotated q.
        A backend whose attention reads keys only from the cache may fuse the two."""
        q, k = self.rotary(q, k, rot)
        self.write_kv(k_cache, v_cache, k, v, meta)
        return q

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x): the next sublayer's input and residual."""
        summed = residual + x
        return rms_norm(summed, weight, eps), summed

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
