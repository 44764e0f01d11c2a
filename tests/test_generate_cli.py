"""`pdserve generate` as a user runs it: a real subprocess over a JSON-lines file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.generate_command import InputError, parse_prompt_lines
from protocol.sampling import SamplingParams


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "generate", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_generate_outputs_json_lines_in_order(smollm2_dir: Path, tmp_path: Path):
    lines = [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"prompt": "The quick brown fox", "max_tokens": 5},
        {"messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0.7, "seed": 3},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "stop": "Paris"},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "stop": ["Paris"],
         "include_stop_str_in_output": True},
    ]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    proc = _run(["--prompts-file", str(f), "--model", str(smollm2_dir), "--max-tokens", "16",
                 "--temperature", "0", "--json", "--num-kv-blocks", "128"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        assert set(r) == {"index", "prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert r["finish_reason"] in ("stop", "length") and r["token_ids"]
    assert "Paris" in records[0]["text"]
    assert len(records[1]["token_ids"]) == 5 and records[1]["finish_reason"] == "length"
    # A stop string ends the request where it appears (greedy: same tokens as line 0 up to there).
    before = records[0]["text"].split("Paris")[0]
    assert records[3]["text"] == before and records[3]["finish_reason"] == "stop"
    assert records[4]["text"] == before + "Paris" and records[4]["finish_reason"] == "stop"
    assert len(records[3]["token_ids"]) < len(records[0]["token_ids"])
    assert records[3]["token_ids"] == records[0]["token_ids"][: len(records[3]["token_ids"])]
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert set(stats) == {"generation_seconds", "prompt_tokens", "generated_tokens", "tokens_per_second"}
    assert stats["generated_tokens"] == sum(len(r["token_ids"]) for r in records)
    assert stats["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in records)


def test_bad_lines_are_named_and_nothing_runs(tmp_path: Path):
    f = tmp_path / "bad.jsonl"
    f.write_text(
        '{"prompt": "ok"}\n'
        "not json\n"
        '{"prompt": 3}\n'
        '{"prompt": "a", "messages": []}\n'
        '{"prompt": "x", "temperature": 9}\n'
        '{"prompt": "x", "colour": "red"}\n'
    )
    proc = _run(["--prompts-file", str(f), "--model", str(tmp_path / "never-loaded")], tmp_path)
    assert proc.returncode == 2
    err = proc.stderr
    for n in (2, 3, 4, 5, 6):
        assert f"line {n}:" in err
    assert "line 1:" not in err
    assert "temperature" in err and "colour" in err and proc.stdout == ""


def test_missing_file_is_a_clear_error(tmp_path: Path):
    proc = _run(["--prompts-file", str(tmp_path / "nope.jsonl")], tmp_path)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr


def test_parse_applies_defaults_and_per_line_fields():
    text = '{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}], "top_k": 5, "max_tokens": 7}\n'
    parsed = parse_prompt_lines(text, SamplingParams(max_tokens=20, temperature=0.0))
    assert [p.max_tokens for _, p in parsed] == [20, 7]
    assert parsed[1][1].top_k == 5 and parsed[1][1].temperature == 0.0
    (_, p), = parse_prompt_lines('{"prompt": "a", "stop": "x"}', SamplingParams())
    assert p.stop == ["x"]
    with pytest.raises(InputError, match="line 1: .*stop"):
        parse_prompt_lines('{"prompt": "a", "stop": [""]}', SamplingParams())
    with pytest.raises(InputError, match="no prompts"):
        parse_prompt_lines("\n\n", SamplingParams())
