"""The structured-output fields of a request, as one StructuredOutput (or none), checked at once.

Accepted spellings (one per request):
  OpenAI     response_format {"type": "json_object"} | {"type": "json_schema", "json_schema":
             {"name": ..., "schema": {...}, "strict": ...}} ("text" means none). The schema is
             enforced whether or not `strict` is set, as vLLM does.
  vLLM       structured_outputs {"json": schema | text, "regex": ..., "choice": [...],
             "grammar": Lark or GBNF, "json_object": true}
  vLLM (old) guided_json, guided_regex, guided_choice, guided_grammar
The spec is compiled here without a vocabulary, so a bad schema, regex or grammar is a 400
before anything is queued. Pure: raises APIError.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import APIError
from protocol.structured_output import (
    StructuredOutput, StructuredOutputError, check_structured_output, json_schema_output,
)

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_output_of(req: Any) -> StructuredOutput | None:
    found: list[tuple[str, StructuredOutput]] = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _structured_outputs(req.structured_outputs)))
    for field, key in _GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, _vllm_spec(key, value, field)))
    if not found:
        return None
    if len(found) > 1:
        raise APIError(400, f"give one structured output, not {' and '.join(f for f, _ in found)}",
                       param=found[1][0])
    field, spec = found[0]
    try:
        check_structured_output(spec)
    except StructuredOutputError as exc:
        raise APIError(400, str(exc), param=field) from None
    return spec


def _response_format(fmt: Any) -> StructuredOutput | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    if fmt.type == "json_schema":
        holder = fmt.json_schema
        if not isinstance(holder, dict) or "schema" not in holder and "json_schema" not in holder:
            raise APIError(400, 'response_format json_schema needs "json_schema": {"name": ..., '
                           '"schema": {...}}', param="response_format.json_schema")
        schema = holder.get("schema", holder.get("json_schema"))
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, "the schema must be a JSON object", param="response_format.json_schema.schema")
        return json_schema_output(schema)
    raise APIError(400, f"response_format type {fmt.type!r} is not one of text, json_object, "
                   "json_schema", param="response_format.type")


def _structured_outputs(value: Any) -> StructuredOutput:
    if not isinstance(value, dict):
        raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
    given = {k: v for k, v in value.items() if v is not None and k in
             ("json", "regex", "choice", "grammar", "json_object")}
    unknown = sorted(set(value) - {"json", "regex", "choice", "grammar", "json_object",
                                   "disable_any_whitespace", "disable_fallback",
                                   "disable_additional_properties", "whitespace_pattern"})
    if unknown:
        raise APIError(400, f"structured_outputs has unknown field {unknown[0]!r}",
                       param=f"structured_outputs.{unknown[0]}")
    if len(given) != 1:
        raise APIError(400, "structured_outputs needs exactly one of json, regex, choice, grammar, "
                       "json_object", param="structured_outputs")
    key, spec = next(iter(given.items()))
    if key == "json_object":
        if spec is not True:
            raise APIError(400, "json_object must be true", param="structured_outputs.json_object")
        return StructuredOutput("json_object")
    return _vllm_spec(key, spec, f"structured_outputs.{key}")


def _vllm_spec(key: str, value: Any, param: str) -> StructuredOutput:
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise APIError(400, f"the JSON schema is not valid JSON: {exc}", param=param) from None
        if not isinstance(value, (dict, bool)):
            raise APIError(400, "a JSON schema must be an object", param=param)
        return json_schema_output(value)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise APIError(400, "choice must be a non-empty list of non-empty strings", param=param)
        return StructuredOutput("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{key} must be a non-empty string", param=param)
    return StructuredOutput(key, value)
