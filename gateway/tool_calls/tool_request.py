"""A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked and planned.

`tool_choice` "required" and a named function are enforced by a grammar (a JSON schema the
worker's sampler follows), so any model returns valid calls: a named choice generates the
function's arguments object; "required" generates `[{"name": ..., "parameters": {...}}, ...]`
(one item when parallel_tool_calls is false), as vLLM does. "auto" (the default when tools are
given) leaves the model free: the tools go through the chat template and the output is parsed
by the `--tool-call-parser`. Pure: raises APIError naming the offending field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import APIError
from protocol.structured_output import (
    StructuredOutput, StructuredOutputError, check_structured_output, json_schema_output,
)

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]  # normalised OpenAI tool objects, for the chat template
    function_name: str | None = None  # the named function
    structured: StructuredOutput | None = None  # the grammar of "required" and named choices

    @property
    def reads_calls(self) -> bool:
        """Whether the output is read for tool calls (not with tool_choice "none")."""
        return self.mode != "none"

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"].get("parameters") or ANY_OBJECT for t in self.tools}


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None
               ) -> ToolPlan | None:
    """None without tools. With tool_choice "none" the tools still reach the template (the
    model knows them, as with OpenAI and vLLM) but the output is plain content."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if not tools:
        return None
    normalised = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in normalised]
    if len(set(names)) != len(names):
        raise APIError(400, "tool function names must be unique", param="tools")
    if tool_choice == "none":
        return ToolPlan("none", normalised)
    plan = ToolPlan("auto", normalised)
    if tool_choice is None or tool_choice == "auto":
        return plan
    if tool_choice == "required":
        plan.mode = "required"
        plan.structured = json_schema_output(_required_schema(plan.parameters, parallel_tool_calls))
        return plan
    name = _named_choice(tool_choice)
    if name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools",
                       param="tool_choice")
    plan.mode, plan.function_name = "named", name
    plan.structured = json_schema_output(plan.parameters[name])
    return plan


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise APIError(400, 'each tool must be {"type": "function", "function": {...}}', param=where)
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise APIError(400, "a tool needs a function object", param=f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise APIError(400, "function names are 1-64 letters, digits, '_', '-' or '.'",
                       param=f"{where}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(400, "description must be a string", param=f"{where}.function.description")
    parameters = fn.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise APIError(400, "parameters must be a JSON schema object",
                           param=f"{where}.function.parameters")
        try:
            check_structured_output(json_schema_output(parameters))
        except StructuredOutputError as exc:
            raise APIError(400, str(exc), param=f"{where}.function.parameters") from None
    out: dict[str, Any] = {"name": name}
    if description is not None:
        out["description"] = description
    out["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": out}


def _named_choice(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
    raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                   '{"type": "function", "function": {"name": ...}}', param="tool_choice")


def _required_schema(parameters: dict[str, dict[str, Any]], parallel: bool | None) -> dict[str, Any]:
    """An array of at least one call object; one at most unless parallel calls are allowed."""
    calls = [{"type": "object",
              "properties": {"name": {"const": name}, "parameters": params},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, params in parameters.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema
