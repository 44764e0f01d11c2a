"""Helpers of the protocol tests (tests/test_protocol_*.py): field-by-field message equality and
small logprob arrays that travel inside the msgpack body.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from protocol.messages import TokenLogprobs


def small_logprobs() -> TokenLogprobs:
    """Arrays under the inline threshold: they travel inside the body."""
    return TokenLogprobs(
        token_ids=np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int64),
        logprobs=np.array([[-0.1, -2.0, -3.5], [-0.2, -1.0, -4.0]], dtype=np.float32),
        ranks=np.array([1, 2], dtype=np.int64),
    )


def assert_same(a: Any, b: Any, path: str = "msg") -> None:
    """Field-by-field equality; arrays by dtype, shape and content."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert b.dtype == a.dtype, path
        assert b.shape == a.shape, path
        assert np.array_equal(a, b), path
    elif isinstance(a, msgspec.Struct):
        assert type(b) is type(a), path
        for name in a.__struct_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(b) == len(a), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(b) is type(a), f"{path}: {type(a)} != {type(b)}"
        assert b == a, path
