"""What a structured-output request constrains the output to, and its llguidance grammar.

`StructuredOutput` rides inside `SamplingParams` from the gateway to the worker. Its `source` is
the client's text (a JSON schema, a regex, a JSON list of choices, a Lark or GBNF grammar), so
the worker compiles and caches by that text. `grammar_text` turns a spec into llguidance's
grammar (pure, no tokenizer); `check_structured_output` compiles it without a vocabulary, which
catches bad schemas, regexes and grammars in well under a millisecond, so the gateway answers
400 before anything is queued. llguidance needs no torch, so every stage may import this.

JSON is generated compactly and in one layout: properties in the schema's order, `", "` between
items and `": "` after keys, no other whitespace; an object lists only its schema's properties
unless the schema allows others (`close_objects`). A small model cannot then pad an answer with
whitespace until max_tokens, and streaming tool-call parsers see one fixed shape.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SOURCE_CHARS = 1 << 18


class StructuredOutputError(ValueError):
    """The schema, regex, choice list or grammar cannot be compiled; the message says why."""


class StructuredOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A constraint on the output. `source` by kind: json_schema: the schema as JSON text;
    json_object: ignored (any JSON object); regex: the pattern; choice: a JSON list of strings;
    grammar: a Lark grammar, or GBNF (llama.cpp / xgrammar EBNF, recognised by `::=`)."""

    kind: str
    source: str = ""

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.kind, self.source)


def json_schema_output(schema: dict | bool) -> StructuredOutput:
    """A spec for `schema` (a dict; JSON `true` means any JSON value)."""
    return StructuredOutput("json_schema", json.dumps(schema, separators=(",", ":")))


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for `spec`; raises StructuredOutputError for malformed input."""
    from llguidance import LLMatcher

    if spec.kind not in KINDS:
        raise StructuredOutputError(f"unknown structured output kind {spec.kind!r}")
    if len(spec.source) > MAX_SOURCE_CHARS:
        raise StructuredOutputError(f"the {spec.kind} is longer than {MAX_SOURCE_CHARS} characters")
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except ValueError as exc:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError("a JSON schema must be an object")
        return LLMatcher.grammar_from_json_schema(close_objects(schema), defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(
            json.dumps(c) for c in _choices(spec.source)))
    return LLMatcher.grammar_from_lark(_lark_of(spec.source))


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "unevaluatedItems", "contains",
               "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where an object schema that lists `properties` and says nothing about
    others admits no others (`additionalProperties: false`), as vLLM's default (xgrammar's strict
    mode) does: otherwise a small model invents keys until max_tokens. Only schema positions are
    visited, so a property that happens to be named "properties" is left alone."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and not any(
            k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
        out["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(sub) for sub in out[key]]
    return out


def check_structured_output(spec: StructuredOutput) -> str:
    """Compile `spec` without a vocabulary; return its grammar or raise StructuredOutputError."""
    from llguidance import LLMatcher

    grammar = grammar_text(spec)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise StructuredOutputError(f"invalid {spec.kind}: {messages[0].strip()}")
    return grammar


def _choices(source: str) -> list[str]:
    try:
        choices = json.loads(source)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(
            isinstance(c, str) and c for c in choices):
        raise StructuredOutputError("choice must be a non-empty list of non-empty strings")
    return choices


def _lark_of(source: str) -> str:
    """A grammar as Lark: GBNF (rules written `name ::= ...`) is converted, Lark passes."""
    if not source.strip():
        raise StructuredOutputError("the grammar is empty")
    if "::=" not in source:
        return source
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(source)
    except Exception as exc:  # the converter raises plain Exceptions with a position
        raise StructuredOutputError(f"invalid GBNF grammar: {exc}") from None
