"""Tool-call deltas and calls in OpenAI's JSON shapes (streamed chunks and whole messages)."""

from __future__ import annotations

from gateway.tool_calls.call_scanner import ToolCall
from gateway.tool_calls.parsers import ToolCallDelta, new_call_id


def delta_dicts(deltas: list[ToolCallDelta]) -> list[dict]:
    """OpenAI's `delta.tool_calls` items: id, type and name on a call's first delta only."""
    out = []
    for d in deltas:
        item: dict = {"index": d.index}
        if d.id is not None:
            item.update(id=d.id, type="function", function={"name": d.name, "arguments": d.arguments})
        else:
            item["function"] = {"arguments": d.arguments}
        out.append(item)
    return out


def call_dicts(calls: list[ToolCall], deltas: list[ToolCallDelta]) -> list[dict]:
    """`message.tool_calls` of a whole response (ids from the deltas that opened each call)."""
    ids = {d.index: d.id for d in deltas if d.id is not None}
    return [{"id": ids.get(i) or new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]
