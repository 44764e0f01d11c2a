"""Triton's interpreter for the kernel tests (tests/test_triton_kernels*.py), on the CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels with numpy, so every kernel is
checked without a GPU; tests/benchmarks/gpu_kernels.py repeats the checks on CUDA and times
them. The interpreter reads TRITON_INTERPRET when a kernel is decorated (at import) and again at
some calls, so the variable is set while this module imports the kernels and while the tests
run (the autouse `_interpret` fixture, which each test module takes in), and put back as it was
otherwise: other test modules and the processes they start never see it (it concerns only
triton, which nothing else imports). Test modules import the kernels from here (`tk`, `ref`,
`choose_num_splits`), so they are decorated under the interpreter whichever module comes first.

bfloat16 in the interpreter (triton 3.9) differs from a GPU in two ways, which the fixture
below corrects for the kernel tests only: its tl.dot multiplies the raw bits of bf16
operands as integers, and it rounds float32 -> bfloat16 by truncation (biased toward zero: a
relative error near 7e-3 over the three roundings of a bf16 RMSNorm) where a GPU and torch round
to nearest even. test_the_interpreter_computes_bf16_as_a_gpu_does checks that both fixes hold.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

__all__ = ["GPU_LIKE", "_interpret", "choose_num_splits", "ref", "tk", "tl", "triton"]

_PRIOR = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    from gpu_worker import triton_kernels as tk
    from gpu_worker.triton_kernels import reference as ref
    from gpu_worker.triton_kernels.decode_attention import choose_num_splits
    from gpu_worker.triton_kernels.skinny_matmul import skinny_matmul  # noqa: F401 (for the tests)
finally:
    if _PRIOR is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PRIOR


def _rounding_cast(original):
    """The interpreter's float32 -> bfloat16 cast, rounding to nearest even as a GPU does."""

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return TensorHandle(f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    return cast_impl


def _bf16_dot(original):
    """The interpreter's tl.dot, with bfloat16 operands read as the numbers they hold.

    It keeps bfloat16 as raw uint16 bits and hands those to numpy's matmul as integers (seen
    with triton 3.9: a bf16 x bf16 dot off by 1e10); a GPU multiplies the bf16 values exactly and
    accumulates in float32, which float32 numpy on the widened values reproduces.
    """

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = np.ascontiguousarray(h.data, dtype=np.uint16).astype(np.uint32) << 16
        return TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    return create_dot


try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder as _Builder
    from triton.runtime.interpreter import TensorHandle

    GPU_LIKE = callable(getattr(_Builder, "cast_impl", None)) and callable(getattr(_Builder, "create_dot", None))
except ImportError:
    GPU_LIKE = False


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if GPU_LIKE:
        monkeypatch.setattr(_Builder, "cast_impl", _rounding_cast(_Builder.cast_impl))
        monkeypatch.setattr(_Builder, "create_dot", _bf16_dot(_Builder.create_dot))
