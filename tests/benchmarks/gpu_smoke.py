"""GPU smoke check (a script for the lent GPU machine, not a test): the same engine on CUDA.

    python tests/benchmarks/gpu_smoke.py MODEL_DIR [--out DIR]

MODEL_DIR holds config.json and tokenizer files only: weights are dummy (seeded; on CUDA drawn on
the device, so not the CPU's values). Checks that greedy tokens of the CUDA backends (torch and
triton, float32) agree, times bf16 throughput on CUDA, and runs `pdserve up --device cuda` for
one streamed chat request. tests/benchmarks/gpu_backend_check.py compares with transformers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from protocol.config import CacheSettings, ModelSettings, SchedulerSettings
from protocol.sampling import SamplingParams
from pdserve.offline_engine import OfflineEngine, make_request
from tests.service_fixture import wait_until_ready
from tokenizer_svc.tokenizer import Tokenizer


def engine(model: str, device: str, dtype: str, blocks: int, backend: str = "auto") -> OfflineEngine:
    return OfflineEngine(ModelSettings(model=model, load_format="dummy", device=device, dtype=dtype, seed=7,
                                       attention_backend=backend),
                         CacheSettings(num_kv_blocks=blocks), SchedulerSettings(max_num_batched_tokens=2048))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    tok = Tokenizer.from_dir(args.model)
    report: dict = {}
    chats = [tok.apply_chat_template([{"role": "user", "content": f"Tell me about topic {i}."}]) for i in range(8)]
    greedy = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0)
    outs = {}
    for backend in ("torch", "triton"):
        eng = engine(args.model, "cuda", "float32", 512, backend)
        res = eng.generate([make_request(f"r{i}", c, greedy, [2]) for i, c in enumerate(chats)])
        outs[backend] = [r.token_ids for r in res]
    report["greedy_triton_equals_torch"] = sum(a == b for a, b in zip(outs["torch"], outs["triton"]))
    report["greedy_total"] = len(chats)

    eng = engine(args.model, "cuda", "bfloat16", 8192)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write an essay on subject {i}."}]) for i in range(128)]
    params = SamplingParams(max_tokens=128, min_tokens=128, temperature=0.8, top_p=0.95)
    eng.generate([make_request("warm", prompts[0], SamplingParams(max_tokens=4), [2])])
    start = time.perf_counter()
    res = eng.generate([make_request(f"b{i}", pr, params, [2]) for i, pr in enumerate(prompts)])
    secs = time.perf_counter() - start
    report["cuda_bf16_128x128"] = {"seconds": round(secs, 3), "tokens_per_second": round(sum(len(r.token_ids) for r in res) / secs, 1),
                                   "steps": eng.num_steps}

    port = 8123
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--model", args.model, "--load-format", "dummy",
                             "--device", "cuda", "--port", str(port), "--num-kv-blocks", "4096"],
                            stdout=open(Path(args.out) / "up.log", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until_ready(url, 150, alive=lambda: proc.poll() is None):
            raise RuntimeError((Path(args.out) / "up.log").read_text()[-2000:])
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        report["service_status"] = r.status_code
        report["service_last_lines"] = lines[-2:]
        report["workers"] = httpx.get(f"{url}/workers").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(report, indent=1))
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
