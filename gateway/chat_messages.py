"""Chat messages as clients send them -> the dicts the chat template renders.

Text parts are joined by newlines; an assistant turn's earlier `tool_calls` keep their ids and
get their arguments as objects (templates write them with `tojson`: a string would come out
quoted twice); a `tool` turn must say which call it answers (`tool_call_id`). Pure: raises
APIError naming the offending message.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from gateway.errors import APIError

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # an assistant turn's calls (history)
    tool_call_id: str | None = None  # a tool turn: the call it answers


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: text content, text parts joined by newlines."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(400, f"unknown role {m.role!r}; expected one of "
                           f"{sorted(CHAT_ROLES)}", param=f"messages[{i}].role")
        if m.content is None:
            if m.role != "assistant":
                raise APIError(400, "content is required", param=f"messages[{i}].content")
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                where = f"messages[{i}].content[{j}]"
                if part.type != "text":
                    raise APIError(400, f"content part type {part.type!r} is not supported; "
                                   "only \"text\"", param=f"{where}.type")
                if part.text is None:
                    raise APIError(400, "a text part needs \"text\"", param=f"{where}.text")
                texts.append(part.text)
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, "only assistant messages carry tool_calls",
                               param=f"messages[{i}].tool_calls")
            msg["tool_calls"] = [_history_call(c, f"messages[{i}].tool_calls[{j}]")
                                 for j, c in enumerate(m.tool_calls)]
        if m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, "a tool message needs tool_call_id",
                               param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _history_call(call: Any, where: str) -> dict[str, Any]:
    """An earlier assistant tool call, its arguments as an object (templates render them with
    `tojson`; a string would come out quoted twice)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, 'a tool call is {"id": ..., "type": "function", "function": '
                       '{"name": ..., "arguments": "..."}}', param=where)
    arguments = fn.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise APIError(400, "arguments must be a JSON text", param=f"{where}.function.arguments") from None
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": arguments}}
