"""Allowed-token bitmasks: int32 [N, ceil(V / 32)], bit t % 32 of word t // 32 set = token t allowed.

llguidance writes masks in this layout (as xgrammar and vLLM do). Applying one to logits is
batched tensor work on the logits' device: the words are expanded to one boolean per token and
disallowed logits become -inf. A row whose words are all -1 (all bits set) is unconstrained.
"""

from __future__ import annotations

import numpy as np
import torch

_BITS: dict[torch.device, torch.Tensor] = {}  # 0..31 on each device, made once


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def full_bitmask(num_rows: int, vocab_size: int) -> np.ndarray:
    """Every token allowed in every row."""
    return np.full((num_rows, bitmask_words(vocab_size)), -1, dtype=np.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [N, V] from int32 [N, W] (on the bitmask's device)."""
    bits = _BITS.get(bitmask.device)
    if bits is None:
        bits = _BITS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    expanded = (bitmask.unsqueeze(-1) >> bits) & 1  # arithmetic shift: bit 31 reads as 1 too
    return expanded.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` [N, V] with the tokens the bitmask forbids set to -inf."""
    if bitmask.shape != (logits.shape[0], bitmask_words(logits.shape[1])):
        raise ValueError(f"bitmask shape {tuple(bitmask.shape)} does not fit logits "
                         f"{tuple(logits.shape)}")
    return logits.masked_fill(~allowed_tokens(bitmask, logits.shape[1]), float("-inf"))
