"""Device check of prompt logprobs on CUDA (a script for the lent GPU machine, not a test).

    python tests/benchmarks/gpu_prompt_logprobs_check.py --out DIR [--device cpu --backends torch]

A small random Llama (gpu_backend_check.hf_dir) in float32 on the GPU: prompts of 5..300 tokens
with prompt_logprobs, a 64-token step budget (chunked prefill) and 24 greedy tokens after, run
by the offline engine on the triton backend with CUDA graphs (decode steps replay graphs; steps
with prompt rows must run eagerly) and on the torch backend. Each prompt token's logprob is
compared with transformers' float32 forward on the same GPU. Writes DIR/gpu_prompt_logprobs.json.
(`--device cpu --backends torch` runs the same check on a CPU, e.g. to try the script.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdserve.offline_engine import OfflineEngine, make_request  # noqa: E402
from protocol.config import CacheSettings, ModelSettings, SchedulerSettings  # noqa: E402
from protocol.sampling import SamplingParams  # noqa: E402
from tests.benchmarks.gpu_backend_check import hf_dir  # noqa: E402

def reference(path: Path, prompts: list[list[int]], dev: torch.device) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            lp = torch.log_softmax(model(torch.tensor([ids], device=dev)).logits[0].float(), -1)
            out.append(lp[:-1].gather(1, torch.tensor(ids[1:], device=dev).unsqueeze(1))[:, 0].cpu())
    return out


def run(path: Path, prompts: list[list[int]], backend: str, device: str) -> dict:
    engine = OfflineEngine(
        ModelSettings(model=str(path), device=device, dtype="float32", attention_backend=backend),
        CacheSettings(num_kv_blocks=512, block_size=16), SchedulerSettings(max_num_batched_tokens=64),
        check_integrity=True,
    )
    reqs = [make_request(f"r{i}", ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                      prompt_logprobs=2), [2])
            for i, ids in enumerate(prompts)]
    done = engine.generate(reqs)
    replays = getattr(engine.runner.executor, "replays", None)
    return {"rows": [c.prompt_logprobs for c in done], "tokens": [len(c.token_ids) for c in done],
            "graph_replays": replays, "executor": engine.runner.executor.name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="triton,torch")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 17, 64, 65, 130, 300)]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = hf_dir("llama", Path(tmp))
        want = reference(path, prompts, torch.device(args.device))
        for backend in args.backends.split(","):
            got = run(path, prompts, backend, args.device)
            diffs = []
            for rows, ids, ref in zip(got["rows"], prompts, want):
                assert rows.token_ids[:, 0].tolist() == ids[1:], backend
                diffs.append(float((torch.from_numpy(rows.logprobs[:, 0].copy()) - ref).abs().max()))
            report[backend] = {"executor": got["executor"], "graph_replays": got["graph_replays"],
                               "max_abs_diff": max(diffs), "per_prompt": diffs,
                               "output_tokens": got["tokens"]}
            print(backend, json.dumps(report[backend]), flush=True)
    (args.out / "gpu_prompt_logprobs.json").write_text(json.dumps(report, indent=2))
    worst = max(r["max_abs_diff"] for r in report.values())
    sys.exit(0 if worst <= 1e-3 else f"max abs difference {worst} > 1e-3")


if __name__ == "__main__":
    main()
