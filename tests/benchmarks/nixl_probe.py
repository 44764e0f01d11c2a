"""Does NIXL install and move KV blocks between two processes on the lent GPU? (a probe, not a test)

    python tests/benchmarks/nixl_probe.py --out FILE.json

Issue 7 prefers NIXL (`nixl-cu13` on PyPI) for the GPU path if it installs and runs on the device
machine within the carry limit. Two spawned processes each hold a Llama-3.1-8B-shaped KV cache
([32 layers, 2, blocks, 16, 8, 128] bf16); the destination registers its cache with a NIXL agent
(UCX backend), learns the source's agent metadata and block addresses over a pipe (JSON), READs
the blocks of a 512 / 2048 / 8192-token prompt (one descriptor per layer, K/V and block: 32 KiB
each), checks the bytes against the source, and times it against pdserve's cuda-ipc path copy
(`gpu_worker.kv_transfer.block_copy`) on the same pair of caches. Every step reports its error
instead of stopping the probe.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPE = (32, 2, 1024, 16, 8, 128)  # 2 MiB a block in bf16


def make_cache(seed: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(SHAPE, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)


def nixl_api():
    """The agent classes of whichever NIXL build is installed (nixl-cu13 names its module
    nixl_cu13)."""
    try:
        from nixl_cu13 import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl._api import nixl_agent, nixl_agent_config
    return nixl_agent, nixl_agent_config


def block_descs(cache, block_ids: list[int], base: int | None = None):
    """Nx3 int64 (address, bytes, device) of every (layer, k/v, block) slab of these blocks, at
    `base` instead of this cache's own address when given (the peer's cache, same layout)."""
    import numpy as np

    slab = cache[0, 0, 0].numel() * cache.element_size()
    strides = [s * cache.element_size() for s in cache.stride()[:3]]
    layers, kvs, ids = np.meshgrid(np.arange(cache.shape[0]), np.arange(2), np.asarray(block_ids), indexing="ij")
    start = cache.data_ptr() if base is None else base
    addr = start + layers * strides[0] + kvs * strides[1] + ids * strides[2]
    out = np.empty((addr.size, 3), dtype=np.int64)
    out[:, 0] = addr.reshape(-1)
    out[:, 1] = slab
    out[:, 2] = cache.device.index or 0
    return out


def source(conn) -> None:
    report = {}
    try:
        nixl_agent, nixl_agent_config = nixl_api()

        cache = make_cache(1)
        agent = nixl_agent("source", nixl_agent_config(backends=["UCX"]))
        agent.register_memory(cache)
        conn.send_bytes(json.dumps({"meta": agent.get_agent_metadata().hex(),
                                    "base": cache.data_ptr()}).encode())
        json.loads(conn.recv_bytes())  # the destination is done
        conn.send_bytes(json.dumps({"checksum": float(cache.float().sum())}).encode())
    except Exception:
        report["error"] = traceback.format_exc()[-2000:]
        conn.send_bytes(json.dumps(report).encode())


def destination(conn, tokens: list[int], repeats: int, out: dict) -> None:
    import torch

    nixl_agent, nixl_agent_config = nixl_api()

    cache = make_cache(2)
    reference = make_cache(1)  # the source's content, rebuilt from its seed, to check bytes
    agent = nixl_agent("destination", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(cache)
    hello = json.loads(conn.recv_bytes())
    if "error" in hello:
        out["source_error"] = hello["error"]
        return
    remote = agent.add_remote_agent(bytes.fromhex(hello["meta"]))
    src_base = hello["base"]
    rows = []
    for n in tokens:
        nblocks = -(-n // 16)
        src_ids = list(range(nblocks))
        dst_ids = list(range(1024 - nblocks, 1024))
        local_rows = block_descs(cache, dst_ids)
        local = agent.get_xfer_descs(local_rows, "VRAM")
        remote_descs = agent.get_xfer_descs(block_descs(cache, src_ids, base=src_base), "VRAM")
        times = []
        for rep in range(repeats + 1):
            cache[:, :, dst_ids].zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = agent.initialize_xfer("READ", local, remote_descs, remote, b"")
            state = agent.transfer(handle)
            while state not in ("DONE", "ERR"):
                state = agent.check_xfer_state(handle)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            agent.release_xfer_handle(handle)
            if state == "ERR":
                raise RuntimeError("NIXL transfer state ERR")
            if rep:
                times.append(seconds)
        ok = torch.equal(cache[:, :, dst_ids], reference[:, :, src_ids])
        from gpu_worker.kv_transfer.block_copy import copy_blocks

        copy_times = []
        for rep in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            copy_blocks(reference, cache, src_ids, dst_ids)
            torch.cuda.synchronize()
            if rep:
                copy_times.append(time.perf_counter() - t0)
        nbytes = nblocks * 2 * 2**20
        med = sorted(times)[len(times) // 2]
        kmed = sorted(copy_times)[len(copy_times) // 2]
        rows.append({"tokens": n, "blocks": nblocks, "descriptors": len(local_rows), "bytes": nbytes,
                     "nixl_s": med, "nixl_gb_s": nbytes / med / 1e9, "correct": bool(ok),
                     "block_copy_kernel_s": kmed, "nixl_vs_kernel": kmed / med})
        print(json.dumps(rows[-1]), flush=True)
    out["rows"] = rows
    conn.send_bytes(b"{}")
    out["source_checksum"] = json.loads(conn.recv_bytes()).get("checksum")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="nixl_probe.json")
    p.add_argument("--tokens", default="512,2048,8192")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        nixl_api()
        report["import"] = "ok"
    except Exception:
        report["import"] = traceback.format_exc()[-2000:]
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 1
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=source, args=(there,))
    proc.start()
    try:
        destination(here, [int(x) for x in args.tokens.split(",")], args.repeats, report)
    except Exception:
        report["destination_error"] = traceback.format_exc()[-3000:]
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
