"""KV transfer on one GPU (a script for the lent H200, not a test): two worker processes, one
pulling the blocks of a prompt from the other over cuda-ipc and over zmq, against a plain
device-to-device copy of the same blocks in the same run.

    python tests/benchmarks/kv_transfer_gpu.py [--out kv_transfer_gpu.json] [--tokens 512,2048,8192]

Cache shape of Llama-3.1-8B (32 layers, 8 KV heads, head_dim 128, bfloat16, 16-token blocks:
2 MiB a block). This process is the destination; a spawned process is the source and serves its
cache with KVPeerServer. Both fill their caches from the same seed, so this process holds a
reference copy of the source's content: every timed pull is checked against it (the destination
blocks are zeroed before each pull, so the check proves that pull wrote them), and the plain copy
(`dst.index_copy_(2, d, ref.index_select(2, s))`, index lists sent to the device and a synchronize
included: the issue's yardstick, a gather then a scatter, so it moves every byte twice) reads
from it. The "kernel" row times block_copy.copy_blocks (the Triton kernel the cuda-ipc path
launches, or its torch fallback where triton is missing) alone in this process, timed the same way
(id upload and a synchronize included): it moves every byte once, so it beats the plain copy, and
the cuda-ipc rows' "x kernel" says how much of it a whole pull keeps. Prints a table, writes JSON
to --out.

Needs torch with CUDA, numpy, msgspec and pyzmq (carry the last two as wheels to the device).
`--device cpu --num-blocks 64 --tokens 128,512` is a zmq-only dry run of the script on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SEED = 1234


def make_cache(num_blocks: int, device: str) -> torch.Tensor:
    """The source's cache content, identical in every process that calls this (seeded)."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    return torch.randn(LAYERS, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device,
                       dtype=DTYPE, generator=gen)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def source_main(num_blocks: int, device: str, address: str, ready: mp.Queue, stop) -> None:
    """The source worker: serve its cache until told to stop."""
    from gpu_worker.kv_transfer import KVPeerServer

    cache = make_cache(num_blocks, device)
    sync(device)

    async def serve() -> None:
        server = KVPeerServer(cache, address)
        serving = asyncio.create_task(server.run())
        ready.put(server.address)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        server.close()
        await serving

    asyncio.run(serve())


def kernel_copy_seconds(ref: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> float:
    from gpu_worker.kv_transfer.block_copy import copy_blocks

    sync(dst.device.type)
    start = time.perf_counter()
    copy_blocks(ref, dst, src_ids, dst_ids)
    sync(dst.device.type)
    return time.perf_counter() - start


def plain_copy_seconds(ref: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> float:
    sync(dst.device.type)
    start = time.perf_counter()
    s = torch.tensor(src_ids, dtype=torch.long).to(dst.device)
    d = torch.tensor(dst_ids, dtype=torch.long).to(dst.device)
    dst.index_copy_(2, d, ref.index_select(2, s))
    sync(dst.device.type)
    return time.perf_counter() - start


async def measure(args, address: str, ref: torch.Tensor, dst: torch.Tensor) -> list[dict]:
    from gpu_worker.kv_transfer import KVPuller
    from gpu_worker.kv_transfer.block_copy import prepare
    from gpu_worker.kv_transfer.wire import block_bytes
    from protocol.messages import KVPull

    puller = KVPuller(dst, chunk_bytes=args.zmq_chunk_mib << 20, ipc_chunk_bytes=args.ipc_chunk_mib << 20,
                      ipc_inline_bytes=args.ipc_inline_mib << 20)
    rows: list[dict] = []
    transfer_id = 0
    backend = prepare(ref, dst)  # compile the kernel before any timing
    try:
        for tokens in args.tokens:
            n = -(-tokens // BLOCK_SIZE)
            rng = random.Random(tokens)
            src_ids, dst_ids = rng.sample(range(args.num_blocks), n), rng.sample(range(args.num_blocks), n)
            s_dev, d_dev = torch.tensor(src_ids, device=dst.device), torch.tensor(dst_ids, device=dst.device)
            nbytes = n * block_bytes(dst)
            plain = [plain_copy_seconds(ref, dst, src_ids, dst_ids) for _ in range(args.warmup + args.repeats)]
            plain_s = statistics.median(plain[args.warmup:])
            rows.append(row(tokens, "plain copy", nbytes, plain_s, plain_s, plain[0], True, ""))
            kernel, kernel_ok = [], True
            for _ in range(args.warmup + args.repeats):
                dst.index_fill_(2, d_dev, 0)
                kernel.append(kernel_copy_seconds(ref, dst, src_ids, dst_ids))
                kernel_ok = kernel_ok and torch.equal(dst.index_select(2, d_dev), ref.index_select(2, s_dev))
            kernel_s = statistics.median(kernel[args.warmup:])
            rows.append(row(tokens, f"kernel ({backend})", nbytes, kernel_s, plain_s, kernel[0], kernel_ok,
                            "" if kernel_ok else "wrong blocks"))
            for r in rows[-2:]:
                r["ratio_to_kernel"] = kernel_s / r["seconds"]
            for transport in puller.transports[::-1]:  # cuda-ipc first where there is one
                seconds: list[float] = []
                error, correct = "", True
                for _ in range(args.warmup + args.repeats):
                    dst.index_fill_(2, d_dev, 0)
                    sync(dst.device.type)
                    transfer_id += 1
                    done = await puller.pull(KVPull(transfer_id, f"r{transfer_id}", "source", address, src_ids,
                                                    dst_ids, transport, args.timeout), "destination")
                    if not done.ok:
                        error = done.error
                        break
                    seconds.append(done.seconds)
                    correct = correct and torch.equal(dst.index_select(2, d_dev), ref.index_select(2, s_dev))
                if error:
                    rows.append(row(tokens, transport, nbytes, None, plain_s, None, False, error))
                else:
                    median = statistics.median(seconds[args.warmup:])
                    rows.append(row(tokens, transport, nbytes, median, plain_s, seconds[0], correct,
                                    "" if correct else "wrong blocks"))
                    rows[-1]["ratio_to_kernel"] = kernel_s / median
    finally:
        puller.close()
    return rows


def row(tokens: int, transport: str, nbytes: int, seconds: float | None, plain_s: float,
        first_s: float | None, correct: bool, error: str) -> dict:
    return {
        "tokens": tokens, "transport": transport, "bytes": nbytes,
        "seconds": seconds, "first_seconds": first_s,
        "gb_per_s": nbytes / seconds / 1e9 if seconds else None,
        "ratio_to_plain": plain_s / seconds if seconds else None,  # >= 0.8 is the target
        "ratio_to_kernel": None,  # the kernel's own time / this row's
        "correct": correct, "error": error,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'tokens':>6}  {'transport':<15} {'MiB':>7} {'median s':>10} {'GB/s':>8} {'x plain':>8} "
          f"{'x kernel':>8} {'first s':>9}  ok")
    for r in rows:
        secs = f"{r['seconds']:.6f}" if r["seconds"] else "-"
        gbs = f"{r['gb_per_s']:.1f}" if r["gb_per_s"] else "-"
        ratio = f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] else "-"
        to_kernel = f"{r['ratio_to_kernel']:.2f}" if r.get("ratio_to_kernel") else "-"
        first = f"{r['first_seconds']:.4f}" if r["first_seconds"] else "-"
        print(f"{r['tokens']:>6}  {r['transport']:<15} {r['bytes'] / 2**20:>7.0f} {secs:>10} {gbs:>8} "
              f"{ratio:>8} {to_kernel:>8} {first:>9}  {'yes' if r['correct'] else 'NO ' + r['error']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="kv_transfer_gpu.json")
    p.add_argument("--tokens", default="512,2048,8192", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--num-blocks", type=int, default=1024, help="blocks in each cache (2 MiB each)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed pulls first (the first opens cuda-ipc)")
    p.add_argument("--zmq-chunk-mib", type=int, default=4)
    p.add_argument("--ipc-chunk-mib", type=int, default=64, help="pieces of the torch fallback's copy")
    p.add_argument("--ipc-inline-mib", type=int, default=128,
                   help="cuda-ipc copies up to this size are waited for on the event loop")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a zmq-only dry run of this script (use few --num-blocks)")
    args = p.parse_args()
    if max(args.tokens) > args.num_blocks * BLOCK_SIZE:
        p.error(f"--num-blocks {args.num_blocks} holds fewer than {max(args.tokens)} tokens")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    run_dir = tempfile.mkdtemp(prefix="pdserve-kvbench-")
    source = ctx.Process(target=source_main, args=(args.num_blocks, args.device, f"ipc://{run_dir}/kv-source.sock", ready, stop),
                         daemon=True)
    source.start()
    try:
        ref = make_cache(args.num_blocks, args.device)  # the source's content, for checks and the plain copy
        dst = torch.zeros_like(ref)
        address = ready.get(timeout=300)
        rows = asyncio.run(measure(args, address, ref, dst))
    finally:
        stop.set()
        source.join(30)
        if source.is_alive():
            source.kill()
    print_table(rows)
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "layout": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                   "dtype": str(DTYPE), "num_blocks": args.num_blocks},
        "repeats": args.repeats, "warmup": args.warmup,
        "zmq_chunk_mib": args.zmq_chunk_mib, "ipc_chunk_mib": args.ipc_chunk_mib,
        "ipc_inline_mib": args.ipc_inline_mib,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
