"""The Triton kernels (gpu_worker.triton_kernels) against their torch references, on the CPU,
under Triton's interpreter (tests/triton_interpreter.py says how, and how its bf16 is corrected).

Here: the interpreter's corrections hold, the references are the project's own torch path, and
the kernels import no service code. The kernels themselves: test_triton_kernels_attention.py
(decode and prefill attention) and test_triton_kernels_small.py (KV write, RMSNorm, rotary,
SiLU-and-mul); shared caches and tolerances in tests/triton_checks.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests import triton_interpreter
from tests.triton_checks import BF16, F32
from tests.triton_checks import rope_tables as _rope_tables
from tests.triton_interpreter import GPU_LIKE as _GPU_LIKE
from tests.triton_interpreter import ref, tl, triton

_interpret = triton_interpreter._interpret  # autouse: the interpreter, with its bf16 corrected


def test_the_interpreter_computes_bf16_as_a_gpu_does() -> None:
    """The two interpreter fixes above are in force: a bf16 dot and a rounding cast."""
    assert _GPU_LIKE, "this triton's interpreter has no cast_impl/create_dot to correct"

    @triton.jit
    def dot_then_round(a_ptr, b_ptr, out_ptr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
        tl.store(out_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, b).to(tl.bfloat16))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).bfloat16()
    b = torch.randn(16, 16, generator=gen).bfloat16()
    out = torch.full((16, 16), float("nan"), dtype=torch.bfloat16)
    dot_then_round[(1,)](a, b, out)
    assert torch.equal(out, (a.double() @ b.double()).float().bfloat16())


# ------------------------------------------------------------------ the references are the project's


def test_references_follow_the_project() -> None:
    """The references compute what gpu_worker's torch path computes, bit for bit."""
    from gpu_worker.model import rms_norm as model_rms_norm
    from gpu_worker.rope import apply_rotary

    gen = torch.Generator().manual_seed(5)
    for dtype in (F32, BF16):
        x = torch.randn(6, 64, generator=gen).to(dtype)
        w = torch.randn(64, generator=gen).to(dtype)
        assert torch.equal(ref.rms_norm(x, w, 1e-6), model_rms_norm(x, w, 1e-6))
        q = torch.randn(6, 4, 64, generator=gen).to(dtype)
        k = torch.randn(6, 2, 64, generator=gen).to(dtype)
        pos = torch.arange(6) * 7
        cos, sin = _rope_tables(64, 64, dtype)
        rq, rk = ref.rotary_embedding(q, k, pos, cos, sin)
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
        assert torch.equal(rq, apply_rotary(q, c, s)) and torch.equal(rk, apply_rotary(k, c, s))
    assert math.isclose(float(cos[0, 0]), 1.0)


def test_the_package_imports_no_service_code() -> None:
    """The device check script imports the kernels on a bare CUDA image (torch, triton, numpy):
    importing them must not pull in the protocol, sockets or msgspec."""
    code = ("import sys; import gpu_worker.triton_kernels, gpu_worker.triton_kernels.reference; "
            "print(sorted({'protocol', 'zmq', 'msgspec', 'gpu_worker.attention'} & set(sys.modules)))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
