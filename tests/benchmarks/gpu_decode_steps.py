"""Decode step time as the engine runs it: overlapped steps, back to back (a device script).

    python tests/benchmarks/gpu_decode_steps.py --out DIR

gpu_backend_check.py part b times one executor call synchronised: host packing, copies and the
forward, then a wait. The worker does not run that way: with overlapped steps it launches step
N+1 before reading step N's tokens, so the host's work hides behind the device's. Here the real
engine (pdserve.offline_engine.OfflineEngine: scheduler, runner, sampler, overlapped steps, CUDA
graphs) serves B requests of C - 64 prompt tokens and 128 greedy output tokens each (ignore_eos),
so its decode steps span contexts C - 64 .. C + 64 (mean C). For the steps that decode all B
sequences and nothing else it reports the step period (median interval between consecutive
launches; in steady state the host waits for each step's tokens, so this is the device's pace)
and the device time of each step (CUDA events from the step's start to its sampling), against
the floor (weight bytes + B x C x KV bytes per token) / device-to-device copy bandwidth, and a
torch.profiler breakdown by kernel kind of one synchronised step of the same shape. With
--profile-served the same requests are served once more under torch.profiler, and every CUDA
event of that run (kernels, copies, the sampler's work) is summed by kind per step: what the
served steps spend that the synchronised forward alone does not show.
Llama-3.1-8B shapes, dummy bf16 weights; batch 1/16/64/256 x context 512/2048.
"""

from __future__ import annotations

import argparse
import logging
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.gpu_backend_check import (  # noqa: E402
    copy_bandwidth, decode_step, device_time_by_kind, kernel_profile, synthetic_dir,
)
from pdserve.offline_engine import OfflineEngine, make_request  # noqa: E402
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402

NEW_TOKENS = 128


class StepLog:
    """Wraps the engine's executor and runner to note each decode launch and each step's device time."""

    def __init__(self, engine: OfflineEngine) -> None:
        self.launches: list[tuple[float, int, bool]] = []  # (perf_counter, num_seqs, decode only)
        self.device: list[tuple[int, float]] = []  # (num sampled, gpu seconds)
        executor, runner = engine.runner.executor, engine.runner
        forward, finish = executor.forward, runner.finish

        def logged_forward(step, fed=None):
            self.launches.append((time.perf_counter(), step.num_seqs, step.is_decode_only))
            return forward(step, fed)

        def logged_finish(step):
            result = finish(step)
            self.device.append((len(step.states), result.gpu_seconds))
            return result

        executor.forward = logged_forward
        runner.finish = logged_finish

    def clear(self) -> None:
        self.launches.clear()
        self.device.clear()

    def decode_period(self, batch: int) -> tuple[float, int]:
        """Median interval between consecutive launches of full decode-only steps, and their count."""
        gaps = [b[0] - a[0] for a, b in zip(self.launches, self.launches[1:])
                if a[1:] == (batch, True) and b[1:] == (batch, True)]
        return (statistics.median(gaps) if gaps else float("nan")), len(gaps)

    def decode_device_time(self, batch: int) -> float:
        times = [g for n, g in self.device if n == batch and g > 0]
        # The first steps of a batch include prefill rows; the last NEW_TOKENS - 8 are decode only.
        return statistics.median(times[-(NEW_TOKENS - 8):]) if times else float("nan")


def served_profile(engine: OfflineEngine, log: StepLog, batch: int, prompts: list, params: SamplingParams) -> dict:
    """The same requests served again under torch.profiler: per engine step (prefill steps
    included, so the decode-only share dominates but is not alone), device time by kind."""
    from torch.profiler import ProfilerActivity, profile

    log.clear()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate([make_request(f"p{batch}r{i}", p, params, [128001]) for i, p in enumerate(prompts)])
        torch.cuda.synchronize()
    steps = len(log.launches)
    kinds, count = device_time_by_kind(prof, max(1, steps))
    return {"steps": steps, "decode_only_steps": sum(1 for _, n, d in log.launches if d and n == batch),
            "device_ms_per_step": sum(kinds.values()), "events_per_step": count / max(1, steps),
            "by_kind_ms": {k: round(v, 4) for k, v in sorted(kinds.items())}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--profile-served", action="store_true",
                        help="serve each shape again under torch.profiler: device time per step by kind")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # start-up tuning picks
    bandwidth = copy_bandwidth()
    model_dir = synthetic_dir(Path(tempfile.mkdtemp()))
    engine = OfflineEngine(ModelSettings(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16"),
                           CacheSettings(), SchedulerSettings(max_num_seqs=256, max_num_batched_tokens=8192))
    runner = engine.runner
    cfg = runner.config
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weights -= runner.model.embed.numel() * runner.model.embed.element_size()  # only B rows are read
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    log = StepLog(engine)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate([make_request("warm", [1] * 64, SamplingParams(max_tokens=8), [128001])])
    rows = []
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes_read": weights, "rows": rows}
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = [rng.integers(10, 120000, context - NEW_TOKENS // 2).tolist() for _ in range(batch)]
            log.clear()
            start = time.perf_counter()
            engine.generate([make_request(f"c{context}b{batch}r{i}", p, params, [128001])
                             for i, p in enumerate(prompts)])
            wall = time.perf_counter() - start
            period, count = log.decode_period(batch)
            floor = (weights + batch * context * kv_per_token) / bandwidth
            row = {"batch": batch, "context": context, "floor_ms": floor * 1e3, "period_ms": period * 1e3,
                   "period_vs_floor": period / floor, "device_ms": log.decode_device_time(batch) * 1e3,
                   "decode_steps_timed": count, "wall_s": wall}
            try:  # where the device time of one replayed step goes, by kernel kind
                row["profile"] = kernel_profile(runner.executor, decode_step(runner, batch, context, rng))
            except Exception as exc:  # the timings above stand without it
                row["profile"] = repr(exc)
            if args.profile_served:
                try:
                    row["served_profile"] = served_profile(engine, log, batch, prompts, params)
                except Exception as exc:  # the timings above stand without it
                    row["served_profile"] = repr(exc)
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            (args.out / "gpu_decode_steps.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
