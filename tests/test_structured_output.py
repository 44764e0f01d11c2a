"""Structured output: specs compile or fail with a reason, bitmasks apply exactly, matchers replay."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from gpu_worker.sampler import sample
from gpu_worker.sampling_batch import SamplingBatch, SamplingRow
from gpu_worker.seq_state import SeqState
from gpu_worker.structured.grammar_matcher import SeqGrammar
from gpu_worker.structured.step_masks import StructuredDecoding
from gpu_worker.structured.token_bitmask import allowed_tokens, apply_token_bitmask, full_bitmask
from protocol.grammar_compiler import GrammarCompiler
from protocol.sampling import SamplingParams, SamplingParamsError
from protocol.structured_output import (
    StructuredOutput, StructuredOutputError, check_structured_output, close_objects,
    json_schema_output,
)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["city", "n"], "additionalProperties": False}


@pytest.mark.parametrize("spec", [
    json_schema_output(SCHEMA), StructuredOutput("json_object"), StructuredOutput("regex", "a+b?"),
    StructuredOutput("choice", '["yes", "no"]'), StructuredOutput("grammar", 'start: "x" NUM\nNUM: /[0-9]+/'),
    StructuredOutput("grammar", 'root ::= "x" [0-9]+'),
])
def test_valid_specs_compile(spec):
    assert check_structured_output(spec)


@pytest.mark.parametrize("spec, words", [
    (StructuredOutput("json_schema", '{"type": "nope"}'), "nope"),
    (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutput("json_schema", "[1]"), "must be an object"),
    (StructuredOutput("regex", "(ab"), "unclosed group"),
    (StructuredOutput("choice", "[]"), "non-empty list"),
    (StructuredOutput("choice", '["a", 3]'), "non-empty list"),
    (StructuredOutput("grammar", "start: missing_rule"), "missing_rule"),
    (StructuredOutput("grammar", 'root ::= "a" | undefined'), "undefined"),
    (StructuredOutput("grammar", "  "), "empty"),
    (StructuredOutput("xml", "<a/>"), "unknown structured output kind"),
])
def test_invalid_specs_say_why(spec, words):
    with pytest.raises(StructuredOutputError, match=words):
        check_structured_output(spec)


def test_objects_admit_only_their_properties_unless_the_schema_says_otherwise():
    item = {"type": "object", "properties": {"properties": {"type": "string"}}}
    schema = {"type": "object", "properties": {
        "a": item, "b": {"type": "array", "items": item},
        "c": {"anyOf": [item, {"type": "null"}]},
        "d": {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}},
        "e": {"$ref": "#/$defs/x"}}, "$defs": {"x": item}}
    closed = close_objects(schema)
    shut = {**item, "additionalProperties": False}
    assert closed == {**schema, "additionalProperties": False, "properties": {
        "a": shut, "b": {"type": "array", "items": shut}, "c": {"anyOf": [shut, {"type": "null"}]},
        "d": schema["properties"]["d"], "e": {"$ref": "#/$defs/x"}}, "$defs": {"x": shut}}
    assert closed["properties"]["a"]["properties"] == {"properties": {"type": "string"}}  # a name
    assert schema["properties"]["a"] is item and "additionalProperties" not in item  # not mutated


def test_sampling_params_refuse_eos_overrides_under_a_grammar():
    spec = StructuredOutput("regex", "a")
    SamplingParams(structured=spec).validate()
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(structured=spec, ignore_eos=True).validate()
    assert e.value.param == "ignore_eos"
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(structured=spec, min_tokens=2, max_tokens=4).validate()
    assert e.value.param == "min_tokens"


def test_bitmask_expansion_is_exact():
    vocab = 70  # 3 words, the last one partly past the vocabulary
    rng = np.random.default_rng(0)
    allowed = rng.random((4, vocab)) < 0.3
    allowed[:, 31] = True  # bit 31 is the int32 sign bit
    words = np.zeros((4, 3), dtype=np.uint32)
    for r, t in zip(*np.nonzero(allowed)):
        words[r, t // 32] |= np.uint32(1 << (t % 32))
    mask = torch.from_numpy(words.view(np.int32))
    assert torch.equal(allowed_tokens(mask, vocab), torch.from_numpy(allowed))
    logits = torch.randn(4, vocab)
    out = apply_token_bitmask(logits, mask)
    assert torch.equal(out[torch.from_numpy(allowed)], logits[torch.from_numpy(allowed)])
    assert torch.isneginf(out[~torch.from_numpy(allowed)]).all()
    full = torch.from_numpy(full_bitmask(4, vocab))
    assert torch.equal(apply_token_bitmask(logits, full), logits)


def _row(**kw) -> SamplingRow:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, seed=7, output_index=0,
                prompt_token_ids=(), output_token_ids=(), banned_token_ids=(), num_logprobs=None)
    return SamplingRow(**{**base, **kw})


def test_sampler_never_draws_a_masked_token():
    vocab = 64
    words = np.zeros((2, 2), dtype=np.uint32)
    words[0, 0] = 1 << 5  # row 0: only token 5
    words[1, 1] = (1 << 3) | (1 << 9)  # row 1: tokens 35 and 41
    logits = torch.randn(2, vocab) * 5
    logits[:, 0] = 100.0  # the unconstrained favourite
    for seed in range(20):
        rows = [_row(temperature=0.0), _row(seed=seed, output_index=seed)]
        batch = SamplingBatch.build(rows, vocab, torch.device("cpu"), words.view(np.int32))
        tokens = sample(logits, batch).token_ids.tolist()
        assert tokens[0] == 5 and tokens[1] in (35, 41)


@pytest.fixture(scope="module")
def compiler(smollm2_dir):
    return GrammarCompiler.for_dir(smollm2_dir, 49152)


def _allowed(grammar, vocab=49152) -> set[int]:
    row = full_bitmask(1, vocab)[0]
    grammar.fill(row)
    return set(np.nonzero(allowed_tokens(torch.from_numpy(row[None]), vocab)[0].numpy())[0].tolist())


def test_matcher_replays_outputs_and_allows_eos_only_when_complete(compiler, smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_ids
    spec = json_schema_output(SCHEMA)
    text = json.dumps({"city": "Paris", "n": 3})
    ids = tok.hf_tokenizer.encode(text, add_special_tokens=False)
    prompt = [1, 2, 3]
    live = SeqGrammar.start(compiler, spec, eos)
    masks = []
    for i in range(len(ids) + 1):
        live.sync(prompt + ids[:i], len(prompt))  # one token at a time, as the runner does
        masks.append(_allowed(live))
        if i < len(ids):
            assert ids[i] in masks[-1]
            assert not set(eos) & masks[-1]  # the object is open: no EOS
    assert masks[-1] == set(eos)  # complete: only EOS
    for cut in (0, 3, len(ids)):  # a matcher met mid-output (preemption, migration, handoff)
        replayed = SeqGrammar.start(compiler, spec, eos)
        replayed.sync(prompt + ids[:cut], len(prompt))
        assert _allowed(replayed) == masks[cut]
    assert compiler.compile_seconds and len(compiler.compile_seconds) == 1  # cached by source


def test_a_matcher_that_fails_allows_only_eos(compiler, smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_ids
    g = SeqGrammar.start(compiler, StructuredOutput("regex", "[0-9]+"), eos)
    g.sync([0] + smollm2_tokenizer.hf_tokenizer.encode("abc", add_special_tokens=False), 1)
    assert g.failed and _allowed(g) == set(eos)
    assert "does not match the grammar" in g.error


# Valid without a vocabulary, so the gateway passes them; llguidance rejects them with SmolLM2's.
UNSERVABLE = [
    (StructuredOutput("grammar", "start: <|no_such_token|>"), 'unknown special token: "<|no_such_token|>"'),
    (StructuredOutput("grammar", 'start: "a" <[99999]>'), "Token range end too large: 99999"),
]


@pytest.mark.parametrize("spec, words", UNSERVABLE)
def test_a_grammar_the_vocabulary_cannot_serve_fails_only_with_the_tokenizer(smollm2_dir, smollm2_tokenizer,
                                                                             spec, words):
    check_structured_output(spec)  # no vocabulary: nothing wrong
    grammars = GrammarCompiler(lambda: smollm2_tokenizer.hf_tokenizer, 49152)
    eos = smollm2_tokenizer.eos_token_ids
    for _ in range(2):
        with pytest.raises(StructuredOutputError, match=re.escape(words)) as e:
            grammars.check(spec, eos)
        assert str(e.value).startswith("the grammar cannot be used with this model's vocabulary: ")
        assert len(str(e.value)) < 500  # llguidance's list of every special token is cut short
    assert len(grammars.compile_seconds) == 1  # the failure is cached by source too
    grammars.check(StructuredOutput("grammar", 'start: "a" <|endoftext|>'), eos)  # a real one is fine
    failed = SeqGrammar.start(grammars, spec, eos)  # the worker's path: a failed grammar, EOS only
    assert failed.failed and words in failed.error and _allowed(failed) == set(eos)


def test_the_tokenizer_stage_refuses_what_the_vocabulary_cannot_serve(smollm2_tokenizer):
    from protocol.messages import GenerateRequest
    from tokenizer_svc.tokenizer_worker import PromptError, PromptPreparer

    tok = smollm2_tokenizer
    preparer = PromptPreparer(tok, 2048, 49152, GrammarCompiler(lambda: tok.hf_tokenizer, 49152))

    def request(spec: StructuredOutput) -> GenerateRequest:
        return GenerateRequest("r", SamplingParams(max_tokens=5, structured=spec), 0.0, prompt="Hi", n=2)

    with pytest.raises(PromptError, match=re.escape(UNSERVABLE[0][1])) as e:
        preparer.prepare(request(UNSERVABLE[0][0]))
    assert e.value.param is None
    good = StructuredOutput("regex", "[0-9]+")
    assert [a.params.structured for a in preparer.prepare(request(good))] == [good, good]


def _seq(rid: str, token_ids: list[int], num_prompt: int, structured: StructuredOutput | None,
         eos: list[int]) -> SeqState:
    return SeqState(rid, token_ids, num_prompt, [], 0, SamplingParams(structured=structured), eos, 0)


def test_failed_grammars_are_reported_per_row_and_spare_the_others(compiler, smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_ids
    digits = StructuredOutput("regex", "[0-9]+")
    letters = smollm2_tokenizer.hf_tokenizer.encode("abc", add_special_tokens=False)
    states = [
        _seq("plain", [5, 6], 2, None, eos),
        _seq("no-compile", [5, 6], 2, UNSERVABLE[0][0], eos),
        _seq("digits", [5, 6], 2, digits, eos),
        _seq("replay-mismatch", [5, *letters], 1, digits, eos),  # outputs the grammar refuses
    ]
    decoding = StructuredDecoding(compiler)
    try:
        masks = decoding.start(states).result()
    finally:
        decoding.close()
    assert sorted(masks.errors) == ["no-compile", "replay-mismatch"]
    assert "unknown special token" in masks.errors["no-compile"]
    assert "does not match the grammar" in masks.errors["replay-mismatch"]
    rows = [set(np.nonzero(allowed_tokens(torch.from_numpy(masks.bitmask[i:i + 1]), 49152)[0].numpy())[0].tolist())
            for i in range(len(states))]
    assert len(rows[0]) == 49152  # unconstrained
    assert rows[1] == rows[3] == set(eos)  # failed rows: EOS only, harmless to sample
    digit_ids = smollm2_tokenizer.hf_tokenizer.encode("7", add_special_tokens=False)
    assert set(digit_ids) <= rows[2] and not set(letters) & rows[2] and not set(eos) & rows[2]


def test_tokens_past_the_end_of_the_output_are_not_a_grammar_failure(compiler, smollm2_tokenizer, caplog):
    """EOS ends a structured output; a step launched before that EOS was read back (overlapped or
    pipelined steps) has sampled one more token for the row, which the scheduler drops. Syncing
    it must not fail the grammar: no 'structured output failed' warning and no error for a
    request that ended well."""
    tok = smollm2_tokenizer
    eos = tok.eos_token_ids
    ids = tok.hf_tokenizer.encode(json.dumps({"city": "Oslo", "n": 2}), add_special_tokens=False)
    prompt = [1, 2, 3]
    g = SeqGrammar.start(compiler, json_schema_output(SCHEMA), eos)
    g.sync(prompt + ids + [eos[0]], len(prompt))
    assert not g.failed and not caplog.records
    g.sync(prompt + ids + [eos[0], eos[0]], len(prompt))
    g.sync(prompt + ids + [eos[0], eos[0], 42], len(prompt))
    assert not g.failed and g.error == ""
    assert _allowed(g) == set(eos)  # and the row can still only end
