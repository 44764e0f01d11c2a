"""Incremental reading of one tool-call object, `{"name": "...", "arguments": {...}}`, as it streams.

A streamed tool call goes out as OpenAI sends it: the function's name once it is complete, then
the arguments' JSON text in fragments as they arrive. `CallScanner` is fed the object's text
piece by piece; as soon as the name has been read it is available, and the text of the arguments
value is handed out as it grows (a bracket/string tracker finds where the value ends, without
parsing it). An object in another layout (arguments before the name, unknown keys) still gives
its call when it is complete (`finish`), just without the early fragments. Pure, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_HEAD = r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:%s)"\s*:\s*(?=\S)'


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text


class ValueEnd:
    """Tracks strings and brackets over a JSON value's text; `end` is where the value closes."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.end: int | None = None  # index just past the value, in the text fed so far
        self._seen = 0

    def feed(self, text: str) -> None:
        for i, ch in enumerate(text):
            if self.end is not None:
                return
            pos = self._seen + i
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.end = pos + 1
                continue
            if ch in " \t\r\n" and not self.started:
                continue
            if ch in "{[":
                self.depth += 1
            elif ch in "}]":
                if self.depth == 0:  # a scalar value ended by its object's brace
                    self.end = pos
                    return
                self.depth -= 1
                if self.depth == 0:
                    self.end = pos + 1
            elif ch == '"':
                self.in_string = True
            elif ch == "," and self.depth == 0:
                self.end = pos
            self.started = True
        self._seen += len(text)


class CallScanner:
    """One call object's text, fed in pieces; `args_keys` are the accepted names of its
    arguments member ("arguments", "parameters")."""

    def __init__(self, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self._head = re.compile(_HEAD % "|".join(re.escape(k) for k in args_keys))
        self.args_keys = args_keys
        self.text = ""
        self.name: str | None = None
        self._args_start: int | None = None
        self._value = ValueEnd()
        self._sent = 0  # characters of the arguments already handed out

    def feed(self, text: str) -> str:
        """Add text; return the arguments' new fragment (empty until the name is known)."""
        self.text += text
        if self._args_start is None:
            head = self._head.match(self.text)
            if head is None:
                return ""
            self.name = json.loads(f'"{head.group(1)}"')
            self._args_start = head.end()
            self._value.feed(self.text[self._args_start:])
        else:
            self._value.feed(text)
        end = len(self.text) if self._value.end is None else self._args_start + self._value.end
        fragment = self.text[self._args_start + self._sent:end]
        self._sent += len(fragment)
        return fragment

    @property
    def streamed_arguments(self) -> str:
        return "" if self._args_start is None else self.text[self._args_start:self._args_start + self._sent]

    def finish(self) -> ToolCall | None:
        """The complete call, or None if the text is not a call object."""
        try:
            obj = json.loads(self.text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if self._args_start is not None and self._value.end is not None:  # the text as streamed
            return ToolCall(obj["name"], self.text[self._args_start:self._args_start + self._value.end])
        args = next((obj[k] for k in self.args_keys if k in obj), {})
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))
