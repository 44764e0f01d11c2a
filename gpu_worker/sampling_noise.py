"""Counter-based sampling noise: a pure function of (seed, output index, token id).

The per-row part (seed, output_index) -> 32-bit key is hashed once on the host when a batch is
built (`noise_key` runs on Python ints and on tensors alike); the per-token part
(`uniform_noise`) is batched int64 tensor work on the logits' device. Both the batch builder
and the sampler use this module, which imports neither.
"""

from __future__ import annotations

from typing import TypeVar

import torch

IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)

_MASK32 = 0xFFFFFFFF
# Mixer constants (hash-prospector's two-multiply 32-bit avalanche); both < 2^31, so with
# operands < 2^32 every product stays below 2^63 and int64 arithmetic never overflows.
_MUL_A = 0x21F0AAAD
_MUL_B = 0x735A2D97
# Distinct salts so the seed and the index rounds never start from the same state.
_SALT_SEED = 0x243F6A88
_SALT_INDEX = 0x13198A2E
# Weyl step (2^32 / golden ratio, negated mod 2^32 so that it is < 2^31).
_WEYL = 0x61C88647
_TWO_POW_MINUS_32 = 2.0**-32


def hash32(x: IntOrTensor) -> IntOrTensor:
    """32-bit avalanche mix of values in [0, 2^32), for Python ints and int64 tensors alike
    (only ^ >> * & are used, so both give the same bits); the result is in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 15)


def noise_key(seed: IntOrTensor, output_index: IntOrTensor) -> IntOrTensor:
    """A row's 32-bit noise key from (seed, output_index): each 32-bit piece of each input
    gets its own hash round, so nearby seeds or indices give unrelated keys.

    Seeds are int64 (a negative Python int or tensor value shifts arithmetically, and the
    mask then keeps the raw high bits), output indices non-negative.
    """
    key = hash32((seed & _MASK32) ^ _SALT_SEED)
    key = hash32(key ^ ((seed >> 32) & _MASK32))
    key = hash32(key ^ (output_index & _MASK32) ^ _SALT_INDEX)
    return hash32(key ^ ((output_index >> 32) & _MASK32))


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[r, v] in the open interval (0, 1), float64 [R, V], a pure function of (keys[r], v).

    Counter-based (splitmix32-style): the token id walks a Weyl sequence offset by the row's
    key, and one avalanche round turns each step into 32 random bits. Token ids are < 2^31
    and the Weyl constant < 2^32, so the product stays below 2^63.
    """
    steps = torch.arange(vocab_size, dtype=torch.int64, device=keys.device) * _WEYL
    bits = hash32((steps.unsqueeze(0) + keys.unsqueeze(1)) & _MASK32)
    return bits.double().add_(0.5).mul_(_TWO_POW_MINUS_32)
