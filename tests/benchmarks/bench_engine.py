"""Offline throughput of `pdserve generate` against transformers, on the same prompts in one run.

A script, not a test (pytest does not collect it). Three figures, measured one after the other so
no two compete for the CPU cores:
  1. `pdserve generate` as a subprocess (its stderr stats line; generation time excludes loading);
  2. transformers continuous batching, `generate_batch` (only that call is timed);
  3. transformers `generate`, one prompt at a time (only the generate calls are timed).
1 and 2 alternate for --rounds rounds (this VM's speed drifts by 10-20% over minutes); the CB
ratio is the median of the per-round ratios, the one-at-a-time ratio uses pdserve's median, and
the table shows the round with the median pdserve throughput.
Every prompt is forced to yield exactly --max-tokens new tokens (pdserve: ignore_eos + min_tokens;
transformers: min_new_tokens, or EOS disabled where min_new_tokens is not supported), so all three
do the same work. Unknown flags pass through to `pdserve generate` (e.g. --max-num-batched-tokens).

    .venv/bin/python tests/benchmarks/bench_engine.py [--device cuda] [--max-num-batched-tokens 512]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing it

from bench_prompts import build_chats, write_prompts_file  # noqa: E402 (beside this script)
from quiet_machine import BUSY_WARNING_CORES, git_state, machine_info, measured  # noqa: E402

MODEL = "smollm2-135m"
PDSERVE_DEFAULT_BATCHED_TOKENS = 1024  # pdserve's --max-num-batched-tokens default
CB_PAGE_SIZE = 16  # = pdserve's default KV block size
PHASES = ("pdserve", "hf_sequential", "hf_continuous_batching")
LABELS = {"pdserve": "pdserve generate", "hf_sequential": "transformers generate (one at a time)",
          "hf_continuous_batching": "transformers generate_batch (CB)"}

def run_pdserve(prompts_file: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Run `pdserve generate`, check every output has exactly max_tokens ids, return its stats."""
    exe = Path(sys.executable).with_name("pdserve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pdserve.cli"]
    cmd += ["generate", "--prompts-file", str(prompts_file), "--max-tokens", str(args.max_tokens),
            "--temperature", "0", "--json", "--model", MODEL, "--dtype", args.dtype,
            "--device", args.device, *extra]
    print(f"[pdserve] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pdserve generate failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(records) != args.num_prompts:
        raise SystemExit(f"pdserve printed {len(records)} results, expected {args.num_prompts}")
    bad = [r["index"] for r in records if len(r["token_ids"]) != args.max_tokens]
    if bad:
        raise SystemExit(f"pdserve outputs {bad} do not have {args.max_tokens} tokens")
    return {"command": shlex.join(cmd), "stats": stats, "process_wall_seconds": round(wall, 3),
            "prompt_token_ids": [r["prompt_token_ids"] for r in records],
            "token_ids": [r["token_ids"] for r in records]}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf_sequential(
    model: PreTrainedModel, prompts: list[list[int]], args: argparse.Namespace, eos_ids: list[int]
) -> dict[str, Any]:
    """One `generate` call per prompt; min_new_tokens suppresses EOS exactly as pdserve's min_tokens."""
    import torch

    def generate(ids: list[int], new: int) -> list[int]:
        x = torch.tensor([ids], device=args.device)
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
        return y[0, len(ids):].tolist()

    with torch.no_grad():
        generate(prompts[0], 4)  # warm-up
        _sync(args.device)
        outputs, per_prompt = [], []
        for ids in prompts:
            start = time.perf_counter()
            out = generate(ids, args.max_tokens)
            _sync(args.device)
            per_prompt.append(time.perf_counter() - start)
            outputs.append(out)
    seconds = sum(per_prompt)
    generated = sum(len(o) for o in outputs)
    if any(len(o) != args.max_tokens for o in outputs):
        raise SystemExit("transformers generate did not produce max_tokens for every prompt")
    return {"generation_seconds": round(seconds, 4), "generated_tokens": generated,
            "tokens_per_second": round(generated / seconds, 2),
            "seconds_per_prompt": [round(t, 3) for t in per_prompt],
            "settings": {"attn_implementation": model.config._attn_implementation,
                         "max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens,
                         "do_sample": False, "eos_token_id": eos_ids},
            "token_ids": outputs}


def cb_settings(args: argparse.Namespace, extra: list[str], prompts: list[list[int]]) -> dict[str, Any]:
    """Batching settings close to pdserve's: same token budget per step, every request admitted
    at once, KV pages of pdserve's block size and just enough of them for the whole run."""
    budget = PDSERVE_DEFAULT_BATCHED_TOKENS
    for i, flag in enumerate(extra):
        if flag == "--max-num-batched-tokens" and i + 1 < len(extra):
            budget = int(extra[i + 1])
        elif flag.startswith("--max-num-batched-tokens="):
            budget = int(flag.split("=", 1)[1])
    blocks = sum(math.ceil((len(p) + args.max_tokens) / CB_PAGE_SIZE) for p in prompts)
    return {"page_size": CB_PAGE_SIZE, "num_blocks": blocks + len(prompts), "max_batch_tokens": budget,
            "max_requests_per_batch": len(prompts)}


def run_hf_batch(
    model: PreTrainedModel, prompts: list[list[int]], args: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    """`generate_batch` over all prompts. Its logits processors do not support min_new_tokens, so
    EOS is disabled instead (eos_token_id=-1): every request runs to max_new_tokens."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model.set_attn_implementation("sdpa")  # "paged|sdpa" is deprecated in 5.x and maps to "sdpa"
    gen_config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1)

    def call(batch: list[list[int]]) -> tuple[dict, float]:
        cb_config = ContinuousBatchingConfig(**settings)  # fresh: the manager writes resolved values back
        start = time.perf_counter()
        out = model.generate_batch(batch, generation_config=gen_config, continuous_batching_config=cb_config)
        _sync(args.device)
        return out, time.perf_counter() - start

    call(prompts[:2])  # warm-up
    out, seconds = call(prompts)
    results = list(out.values())
    if len(results) != len(prompts) or any(r.error for r in results):
        raise SystemExit(f"generate_batch returned {len(results)} results for {len(prompts)} prompts")
    outputs = [list(r.generated_tokens) for r in results]
    if any(list(r.prompt_ids) != p for r, p in zip(results, prompts)):
        raise SystemExit("generate_batch results are not in prompt order")
    generated = sum(len(o) for o in outputs)
    return {"generation_seconds": round(seconds, 4), "generated_tokens": generated,
            "tokens_per_second": round(generated / seconds, 2),
            "all_requests_max_tokens": all(len(o) == args.max_tokens for o in outputs),
            "settings": {"attn_implementation": model.config._attn_implementation,
                         "generation_config": {"max_new_tokens": args.max_tokens, "do_sample": False,
                                               "eos_token_id": -1},
                         "continuous_batching_config": settings},
            "token_ids": outputs}


def greedy_matches(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """How many outputs equal the reference token for token; where the others first differ."""
    first_diff = {}
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            diverge = (k for k, (x, y) in enumerate(zip(a, b)) if x != y)
            first_diff[str(i)] = next(diverge, min(len(a), len(b)))
    return {"equal": len(reference) - len(first_diff), "of": len(reference),
            "first_difference_at": first_diff}


def print_report(result: dict[str, Any]) -> None:
    print(f"\n{result['num_prompts']} prompts x {result['max_tokens']} new tokens, "
          f"{result['model']} {result['dtype']} on {result['device']}")
    print(f"{'engine':<40}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}{'other load':>12}")
    for key in (k for k in PHASES if k in result):
        r = result[key]
        figures = r["stats"] if key == "pdserve" else r
        print(f"{LABELS[key]:<40}{figures['generated_tokens']:>8}{figures['generation_seconds']:>10.2f}"
              f"{figures['tokens_per_second']:>11.2f}{r['other_processes_cores']:>12.2f}")
    for key, label in (("hf_sequential", "one-at-a-time"), ("hf_continuous_batching", "continuous batching")):
        if f"ratio_pdserve_over_{key}" in result:
            print(f"pdserve / transformers {label}: {result[f'ratio_pdserve_over_{key}']:.2f}x")
    if result.get("rounds") and result["rounds"][0]["ratio"] is not None:
        per_round = ", ".join(f"{x['ratio']:.2f}x" for x in result["rounds"])
        print(f"  (continuous batching: median of {len(result['rounds'])} rounds: {per_round})")
    busy = [k for k in PHASES if k in result and result[k]["other_processes_cores"] > BUSY_WARNING_CORES]
    if busy:
        print(f"WARNING: other processes kept the CPUs busy during {', '.join(busy)} "
              "('other load', in cores): those figures are unreliable")
    if "greedy_pdserve_vs_hf_sequential" in result:
        g = result["greedy_pdserve_vs_hf_sequential"]
        print(f"greedy check: {g['equal']}/{g['of']} pdserve outputs equal transformers generate"
              " token for token"
              + (f" (first differences at {g['first_difference_at']})" if g["first_difference_at"] else ""))
    references = (("greedy_pdserve_vs_hf_batch", "pdserve outputs equal transformers generate_batch"),
                  ("greedy_hf_batch_vs_hf_sequential", "transformers generate_batch outputs equal generate"))
    for key, text in references:
        if key in result:
            print(f"  for reference: {result[key]['equal']}/{result[key]['of']} {text}")
    if "hf_continuous_batching" in result:
        print(f"transformers CB settings: {json.dumps(result['hf_continuous_batching']['settings'])}")


def print_round(r: int, rnd: dict[str, Any]) -> None:
    pd = rnd["pdserve"]["stats"]["tokens_per_second"]
    line = f"round {r + 1}: pdserve {pd:.1f} tok/s"
    if "hf_continuous_batching" in rnd:
        cb = rnd["hf_continuous_batching"]["tokens_per_second"]
        line += f", transformers CB {cb:.1f} tok/s, ratio {pd / cb:.2f}x"
    print(line, flush=True)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Unknown flags are passed to `pdserve generate`.")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both sides)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating pdserve / transformers CB rounds; figures are the medians")
    p.add_argument("--skip-hf-sequential", action="store_true")
    p.add_argument("--skip-hf-batch", action="store_true")
    p.add_argument("--no-flush-denormal", action="store_true",
                   help="on CPU, leave transformers' denormal handling alone (pdserve always flushes)")
    p.add_argument("--retries", type=int, default=3,
                   help="repeat a phase that other processes disturbed up to this many times")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds to wait for other processes to leave the CPUs before each phase")
    p.add_argument("--output", type=Path, default=Path("bench-results/engine.json"))
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([sys.executable, *sys.argv])
    from protocol.model_files.model_source import default_cache_dir, resolve_model
    from tokenizer_svc.tokenizer import Tokenizer

    hf_dir = resolve_model(MODEL, default_cache_dir())
    tokenizer = Tokenizer.from_dir(hf_dir)
    chats = build_chats(args.num_prompts)
    prompts = [tokenizer.apply_chat_template(c) for c in chats]
    prompts_file = args.output.resolve().with_name(args.output.stem + "-prompts.jsonl")
    write_prompts_file(prompts_file, chats, args.max_tokens)
    result: dict[str, Any] = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "command": command, "git": git_state(REPO), "model": MODEL, "hf_dir": str(hf_dir),
                              "device": args.device, "dtype": args.dtype, "num_prompts": args.num_prompts,
                              "max_tokens": args.max_tokens, "prompts_file": str(prompts_file),
                              "prompt_lengths": [len(p) for p in prompts]}

    if args.skip_hf_sequential and args.skip_hf_batch:
        rounds = [{"pdserve": measured(lambda: run_pdserve(prompts_file, args, extra), args.retries,
                                       args.idle_timeout)} for _ in range(args.rounds)]
    else:
        import torch
        from transformers import AutoModelForCausalLM

        if args.device == "cpu" and not args.no_flush_denormal:
            torch.set_flush_denormal(True)  # as pdserve's CPU runner does
        result["hf_flush_denormal"] = args.device == "cpu" and not args.no_flush_denormal
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        settings = cb_settings(args, extra, prompts)
        # Alternating rounds: this VM's speed drifts by 10-20% over minutes, and a ratio of two
        # figures taken side by side is steadier than either figure.
        rounds = []
        for r in range(args.rounds):
            pd_round = measured(lambda: run_pdserve(prompts_file, args, extra), args.retries, args.idle_timeout)
            rounds.append({"pdserve": pd_round})
            if not args.skip_hf_batch:
                print(f"[transformers] generate_batch, round {r + 1}: {settings}", file=sys.stderr, flush=True)
                rounds[-1]["hf_continuous_batching"] = measured(
                    lambda: run_hf_batch(model, prompts, args, settings), args.retries, args.idle_timeout)
            print_round(r, rounds[-1])
        if not args.skip_hf_sequential:
            print("[transformers] generate, one prompt at a time", file=sys.stderr, flush=True)
            result["hf_sequential"] = measured(
                lambda: run_hf_sequential(model, prompts, args, tokenizer.eos_token_ids),
                args.retries, args.idle_timeout)
    for rnd in rounds:
        if rnd["pdserve"]["prompt_token_ids"] != prompts:
            raise SystemExit("pdserve tokenized the prompts differently from transformers' chat template")
        rnd["pdserve"] = {k: v for k, v in rnd["pdserve"].items() if k != "prompt_token_ids"}
        if "hf_continuous_batching" in rnd:
            rnd["ratio"] = round(rnd["pdserve"]["stats"]["tokens_per_second"]
                                 / rnd["hf_continuous_batching"]["tokens_per_second"], 3)
    # The round with the median pdserve throughput stands for pdserve and transformers CB below.
    by_speed = sorted(rounds, key=lambda x: x["pdserve"]["stats"]["tokens_per_second"])
    median_round = by_speed[(len(by_speed) - 1) // 2]
    pd = result["pdserve"] = median_round["pdserve"]
    if "hf_continuous_batching" in median_round:
        result["hf_continuous_batching"] = median_round["hf_continuous_batching"]
    result["rounds"] = [{"pdserve_tokens_per_second": x["pdserve"]["stats"]["tokens_per_second"],
                         "hf_continuous_batching_tokens_per_second":
                             x.get("hf_continuous_batching", {}).get("tokens_per_second"),
                         "ratio": x.get("ratio"),
                         "other_processes_cores": [x[k]["other_processes_cores"] for k in PHASES if k in x]}
                        for x in rounds]
    if "hf_sequential" in result:
        result["greedy_pdserve_vs_hf_sequential"] = greedy_matches(
            result["hf_sequential"]["token_ids"], pd["token_ids"])
    if "hf_continuous_batching" in result:
        # Informational (CB ignores EOS rather than suppressing it): batched float32 sums can
        # flip a near-tie argmax, so batch-vs-batch may agree where batch-vs-single does not.
        cb_ids = result["hf_continuous_batching"]["token_ids"]
        result["greedy_pdserve_vs_hf_batch"] = greedy_matches(cb_ids, pd["token_ids"])
        if "hf_sequential" in result:
            result["greedy_hf_batch_vs_hf_sequential"] = greedy_matches(
                result["hf_sequential"]["token_ids"], cb_ids)
    result["machine"] = machine_info()

    pd_tps = statistics.median(x["pdserve"]["stats"]["tokens_per_second"] for x in rounds)
    if "hf_sequential" in result:
        result["ratio_pdserve_over_hf_sequential"] = round(pd_tps / result["hf_sequential"]["tokens_per_second"], 3)
    if all("ratio" in x for x in rounds) and rounds:
        result["ratio_pdserve_over_hf_continuous_batching"] = statistics.median(x["ratio"] for x in rounds)
    print_report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
