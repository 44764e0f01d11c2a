"""Step index arrays to the device in one copy: a reusable int32 host buffer (pinned on CUDA).

Every array starts on a 16-byte boundary of the buffer. Triton specializes a kernel on whether
each pointer argument is 16-byte aligned; views at offsets that follow the step's token count
would make a new specialization (a compile of a second or more, mid-serving) appear whenever a
step's counts change residue.
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN = 4  # int32 elements per 16 bytes


def aligned_offsets(sizes: list[int]) -> list[int]:
    """Start of each part when every part starts at a multiple of ALIGN elements."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // ALIGN) * ALIGN
    return offsets + [at]


class HostStaging:
    """A reusable int32 host buffer (pinned on CUDA) and its one copy to the device.

    Reused across steps: before it is overwritten, the previous copy out of it must be done,
    which `to_device` makes sure of with an event (free in practice: that copy was queued a
    step ago and ran before the step's kernels).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty(0, dtype=torch.int32)
        self.done: torch.cuda.Event | None = None

    def to_device(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """Flattened int32 device views of `parts`, in order, each 16-byte aligned."""
        sizes = [int(p.size) for p in parts]
        offsets = aligned_offsets(sizes)
        total = offsets[-1]
        if self.device.type == "cuda" and self.done is not None:
            self.done.synchronize()
        if self.host.numel() < total or self.device.type != "cuda":
            size = max(total, 2 * self.host.numel()) if self.device.type == "cuda" else total
            self.host = torch.zeros(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        view = self.host.numpy()
        for p, at in zip(parts, offsets):
            view[at : at + p.size] = p.ravel()
        if self.device.type == "cuda":
            packed = self.host[:total].to(self.device, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            packed = self.host[:total]  # a fresh buffer each step on CPU: views stay valid
        return [packed[at : at + n] for at, n in zip(offsets, sizes)]
