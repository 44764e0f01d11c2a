"""Device check and timings of the Triton kernels (gpu_worker.triton_kernels) on CUDA.

    python tests/benchmarks/gpu_kernels.py --out kernels.json [--quick]

1. Correctness: every kernel against its torch reference (gpu_worker.triton_kernels.reference,
   float32 math, float64 error sums) over random shapes: ragged lengths, shuffled block tables
   with padding, GQA group sizes 1/4/7/8, head_dim 64/128, block sizes 16 and 32, sliding
   windows, split counts, bf16/fp16/fp32. Outputs are poisoned with NaN first and the caches are
   NaN wherever no real key lives, so an unwritten element or a read past a context shows.
   Relative error ||out - ref|| / ||ref|| is printed for every case and asserted (fp32 1e-5,
   fp16 2e-3, bf16 5e-3). A decode launch is also captured in a CUDA graph and replayed with
   new context lengths.
2. Timings (triton.testing.do_bench medians, L2 flushed before each run) of each kernel against
   the plain-torch way of doing the same thing, at Llama-3.1-8B shapes (32 query heads, 8 KV
   heads, head_dim 128, hidden 4096, intermediate 14336, bf16): decode attention at batch
   1/16/64/256 and context 512/2048, with the floor (KV bytes read / device-to-device copy
   bandwidth measured here), then prefill attention, KV write, RMSNorm+residual, rotary and
   SiLU-and-mul; then small sweeps of the decode split count and the prefill tiles (and, with
   --tile-sweep, the decode tiles, splits, warps and stages at the shapes decode steps serve, as
   CUDA-graph replays; --only-tile-sweep runs that sweep alone). Decode and the small kernels are also timed as CUDA-graph
   replays, which leaves out the host's launch cost that an eager call of a few microseconds
   of device work is bound by.

Imports only torch, triton, numpy and gpu_worker.triton_kernels, so it runs on a bare CUDA
image. Exit status 1 when any check fails (after running everything and writing the JSON).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402

from tests.benchmarks.gpu_kernel_checks import (  # noqa: E402 (beside this script)
    check_decode,
    check_decode_graph,
    check_fusions,
    check_kv_write,
    check_prefill,
)
from tests.benchmarks.gpu_kernel_common import Report  # noqa: E402
from tests.benchmarks.gpu_kernel_timings import (  # noqa: E402
    copy_bandwidth,
    time_decode,
    time_decode_tiles,
    time_prefill,
    time_small,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="fewer random cases, no sweeps")
    parser.add_argument("--tile-sweep", action="store_true", help="also sweep the decode kernel's tiles and warps")
    parser.add_argument("--only-tile-sweep", action="store_true",
                        help="only the decode tile sweep (no checks, no other timings)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="skip the decode tile sweep once this many seconds have passed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    assert not {"protocol", "zmq", "msgspec"} & set(sys.modules), "gpu_worker.triton_kernels pulled in the service"
    start = time.perf_counter()
    rep = Report(args.out)
    print(f"{rep.data['device']}  torch {torch.__version__}  triton {triton.__version__}", flush=True)

    def phase(name: str, fn, *a) -> None:
        t0 = time.perf_counter()
        fn(*a)
        torch.cuda.synchronize()
        rep.data.setdefault("phase_seconds", {})[name] = time.perf_counter() - t0
        rep.save()

    if args.only_tile_sweep:
        phase("time_decode_tiles", time_decode_tiles, rep, copy_bandwidth())
        rep.data["seconds"] = time.perf_counter() - start
        rep.save()
        return 0
    phase("check_decode", check_decode, rep, 10 if args.quick else 28)
    phase("check_decode_graph", check_decode_graph, rep)
    phase("check_prefill", check_prefill, rep, 8 if args.quick else 20)
    phase("check_kv_write", check_kv_write, rep)
    phase("check_fusions", check_fusions, rep)
    bw = copy_bandwidth()
    rep.data["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + written)", flush=True)
    phase("time_decode", time_decode, rep, bw, (1, 16, 64, 256), (512, 2048))
    phase("time_prefill", time_prefill, rep, not args.quick)
    phase("time_small", time_small, rep)
    if args.tile_sweep and time.perf_counter() - start < args.budget_s:
        phase("time_decode_tiles", time_decode_tiles, rep, bw)
    rep.data["seconds"] = time.perf_counter() - start
    rep.save()
    print(f"\n{rep.failures} failed checks of {len(rep.data['checks'])}; {rep.data['seconds']:.0f} s; "
          f"JSON in {args.out}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
