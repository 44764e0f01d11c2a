"""transformers' own continuous batching on the same prompts: the offline baseline of issue 8.

    python tests/benchmarks/hf_generate_batch.py MODEL_DIR WORKLOAD.json OUT.json [--device cuda]

WORKLOAD.json is {"prompts": [[token ids], ...], "output_lens": [n, ...]}. The model is built
from MODEL_DIR's config with random bf16 weights (the same shapes pdserve's dummy load uses),
then every request is added to transformers' ContinuousBatchingManager with its own
max_new_tokens and EOS disabled, so both engines generate exactly the same number of tokens.
If this transformers has no per-request lengths, generate_batch runs with the mean length and
the JSON says so. Run in its own process so pdserve's KV cache is not holding the GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("workload")
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: transformers sizes it)")
    args = p.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    work = json.loads(Path(args.workload).read_text())
    prompts, lens = work["prompts"], work["output_lens"]
    report: dict = {"transformers": transformers.__version__, "requests": len(prompts)}
    config = AutoConfig.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=max(lens), do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_kwargs: dict = {}
    try:  # newer transformers: the batching knobs live in their own config
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb_kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks,
            use_cuda_graph=args.device.startswith("cuda"))
    except ImportError:
        gen = GenerationConfig(max_new_tokens=max(lens), do_sample=False, eos_token_id=-1, pad_token_id=0,
                               max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks)
    report["batching"] = {"max_batch_tokens": args.max_batch_tokens, "num_blocks": args.num_blocks}

    def run(inputs: list[list[int]], out_lens: list[int]) -> tuple[float, int, str]:
        start = time.perf_counter()
        try:
            with model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=5,
                                                           **cb_kwargs) as manager:
                ids = [manager.add_request(ids, max_new_tokens=n, eos_token_id=-1) for ids, n in zip(inputs, out_lens)]
                done, produced = 0, 0
                while done < len(ids):
                    result = manager.get_result(timeout=1)
                    if result is not None and result.is_finished():
                        done += 1
                        produced += len(result.generated_tokens)
                    elif result is None and not manager.is_running():
                        raise RuntimeError("the continuous batching thread stopped")
            return time.perf_counter() - start, produced, "per-request max_new_tokens"
        except (AttributeError, TypeError) as exc:  # an older API: one length for all
            mean = round(sum(out_lens) / len(out_lens))
            start = time.perf_counter()
            out = model.generate_batch(inputs=inputs, generation_config=gen, max_new_tokens=mean, **cb_kwargs)
            produced = sum(len(r.generated_tokens) for r in out.values())
            return time.perf_counter() - start, produced, f"generate_batch, max_new_tokens={mean} for all ({exc})"

    run(prompts[:8], [8] * min(8, len(prompts)))  # warm-up: kernels, graphs
    seconds, produced, how = run(prompts, lens)
    report.update(seconds=seconds, output_tokens=produced, output_throughput=produced / seconds, how=how,
                  asked_tokens=sum(lens), valid=produced == sum(lens) or not how.startswith("per-request"))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
