"""Step index arrays to the device in one copy: a reusable int32 host buffer (pinned on CUDA)."""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """A reusable int32 host buffer (pinned on CUDA) and its one copy to the device.

    Reused across steps: before it is overwritten, the previous copy out of it must be done,
    which `fill` makes sure of with an event (free in practice: a step ends by reading its
    sampled tokens back).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty(0, dtype=torch.int32)
        self.done: torch.cuda.Event | None = None

    def to_device(self, parts: list[np.ndarray]) -> torch.Tensor:
        total = sum(p.size for p in parts)
        if self.device.type != "cuda":
            return torch.from_numpy(np.concatenate([p.ravel() for p in parts]).astype(np.int32))
        if self.done is not None:
            self.done.synchronize()
        if self.host.numel() < total:
            self.host = torch.empty(max(total, 2 * self.host.numel()), dtype=torch.int32, pin_memory=True)
        view = self.host.numpy()
        at = 0
        for p in parts:
            view[at : at + p.size] = p.ravel()
            at += p.size
        out = self.host[:total].to(self.device, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()
        return out


def split_packed(packed: torch.Tensor, num_tokens: int, num_seqs: int, width: int) -> tuple[torch.Tensor, ...]:
    """Views (positions, slots, context_lens, query_start, block_tables) of one packed buffer."""
    sizes = [num_tokens, num_tokens, num_seqs, num_seqs + 1, num_seqs * width]
    positions, slots, ctx, qstart, tables = packed[: sum(sizes)].split(sizes)
    return positions, slots, ctx, qstart, tables.view(num_seqs, width)
