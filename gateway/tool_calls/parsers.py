"""Model output -> content and tool calls, incrementally, for each way a call can be written.

Every parser is fed the choice's text as it streams (`feed`) and told when it ends (`finish`);
both return the new content text and the new `ToolCallDelta`s, so streaming and whole responses
share one path (a whole response is the concatenation of the deltas). A call's first delta has
its id and name, the next ones fragments of its arguments' JSON text, as OpenAI streams them.

  named     tool_choice {"function": ...}: the whole output is the arguments (grammar-enforced)
  required  tool_choice "required": `[{"name": ..., "parameters": {...}}, ...]` (grammar-enforced)
  hermes    auto: text with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  llama3_json  auto: output that starts with `{` is `{"name": ..., "parameters": ...}` objects
            separated by `;`; anything else is content
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gateway.tool_calls.call_scanner import CallScanner, ToolCall, ValueEnd

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallDelta:
    index: int
    arguments: str = ""
    id: str | None = None  # on a call's first delta only, with its name
    name: str | None = None


@dataclass
class ParsedOutput:
    """What `feed`/`finish` return: new content text and new tool-call deltas."""

    content: str = ""
    deltas: list[ToolCallDelta] = field(default_factory=list)


class _CallsParser:
    """Shared bookkeeping: open calls as scanners, turn their progress into deltas."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._scanner: CallScanner | None = None
        self._named = False

    @property
    def made_calls(self) -> bool:
        return bool(self.calls) or self._named

    def _open(self) -> None:
        self._scanner, self._named = CallScanner(), False

    def _feed_call(self, text: str, out: ParsedOutput) -> None:
        scanner = self._scanner
        assert scanner is not None
        fragment = scanner.feed(text)
        if scanner.name is not None and not self._named:
            self._named = True
            out.deltas.append(ToolCallDelta(len(self.calls), fragment, new_call_id(), scanner.name))
        elif fragment:
            out.deltas.append(ToolCallDelta(len(self.calls), fragment))

    def _close(self, out: ParsedOutput) -> str | None:
        """End the open call. Its text if that was no call and nothing of it was sent, for the
        caller to give back as content; None otherwise."""
        scanner, self._scanner = self._scanner, None
        assert scanner is not None
        call = scanner.finish()
        if call is None:
            named, self._named = self._named, False
            if not named:
                return scanner.text
            # streamed already: keep what the client has seen
            self.calls.append(ToolCall(scanner.name or "", scanner.streamed_arguments))
            return None
        index = len(self.calls)
        if not self._named:
            out.deltas.append(ToolCallDelta(index, call.arguments, new_call_id(), call.name))
        elif len(call.arguments) > len(scanner.streamed_arguments):
            out.deltas.append(ToolCallDelta(index, call.arguments[len(scanner.streamed_arguments):]))
        self.calls.append(call)
        self._named = False
        return None


class NamedCallParser(_CallsParser):
    """The output is the arguments of `name` (tool_choice names one function)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._args = ""
        self._id = new_call_id()

    def feed(self, text: str) -> ParsedOutput:
        first = not self._args and not self._named
        self._args += text
        self._named = True
        if first:
            return ParsedOutput(deltas=[ToolCallDelta(0, text, self._id, self.name)])
        return ParsedOutput(deltas=[ToolCallDelta(0, text)] if text else [])

    def finish(self) -> ParsedOutput:
        out = ParsedOutput() if self._named else self.feed("")
        self.calls = [ToolCall(self.name, self._args)]
        return out


class _ObjectSequence(_CallsParser):
    """Call objects one after another, between separators (`,` `;` whitespace) and an
    optional closing `]`."""

    SEPARATORS = " \t\r\n,;"

    def __init__(self) -> None:
        super().__init__()
        self._object: ValueEnd | None = None
        self._object_len = 0  # characters of the open object fed so far
        self.done = False
        self.rest = ""  # text after the sequence (only for error reporting)

    def _feed_objects(self, text: str, out: ParsedOutput) -> None:
        while text and not self.done:
            if self._object is None:
                stripped = text.lstrip(self.SEPARATORS)
                if not stripped:
                    return
                if stripped[0] != "{":
                    self.done, self.rest = True, stripped
                    return
                self._object, self._object_len, text = ValueEnd(), 0, stripped
                self._open()
            self._object.feed(text)
            if self._object.end is None:
                self._object_len += len(text)
                self._feed_call(text, out)
                return
            cut = self._object.end - self._object_len
            self._feed_call(text[:cut], out)
            text = text[cut:]
            self._object = None
            out.content += self._close(out) or ""  # an object that is no call: content

    def _finish_objects(self, out: ParsedOutput) -> None:
        if self._object is not None:
            self._object = None
            out.content += self._close(out) or ""


class RequiredCallsParser(_ObjectSequence):
    """`[{"name": ..., "parameters": ...}, ...]` (tool_choice "required")."""

    def __init__(self) -> None:
        super().__init__()
        self._opened = False

    def feed(self, text: str) -> ParsedOutput:
        out = ParsedOutput()
        if not self._opened:
            stripped = text.lstrip()
            if not stripped:
                return out
            self._opened, text = True, stripped[1:] if stripped[0] == "[" else stripped
        self._feed_objects(text, out)
        return out

    def finish(self) -> ParsedOutput:
        out = ParsedOutput()
        self._finish_objects(out)
        return out


class Llama3JsonParser(_ObjectSequence):
    """Llama 3.x JSON calls; output not starting with `{` is plain content."""

    def __init__(self) -> None:
        super().__init__()
        self._mode: str | None = None  # "calls" | "content"
        self._pending = ""

    def feed(self, text: str) -> ParsedOutput:
        out = ParsedOutput()
        if self._mode is None:
            self._pending += text
            stripped = self._pending.lstrip().removeprefix("<|python_tag|>").lstrip()
            if not stripped or "<|python_tag|>".startswith(self._pending.lstrip()):
                return out
            self._mode = "calls" if stripped[0] == "{" else "content"
            text = stripped if self._mode == "calls" else self._pending
        if self._mode == "content":
            out.content = text
        else:
            self._feed_objects(text, out)
        return out

    def finish(self) -> ParsedOutput:
        out = ParsedOutput()
        if self._mode is None:
            out.content = self._pending
        elif self._mode == "calls":
            self._finish_objects(out)
        return out


class HermesParser(_CallsParser):
    """Content with `<tool_call>` JSON `</tool_call>` blocks (Hermes, Qwen 2.5, the bundled
    template). A possible start of a tag is held back until it is decided."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._inside = False

    def feed(self, text: str) -> ParsedOutput:
        out = ParsedOutput()
        self._buffer += text
        while self._buffer:
            tag = HERMES_END if self._inside else HERMES_START
            at = self._buffer.find(tag)
            if at < 0:
                keep = _partial_suffix(self._buffer, tag)
                ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                self._emit(ready, out)
                return out
            self._emit(self._buffer[:at], out)
            self._buffer = self._buffer[at + len(tag):]
            if self._inside:
                self._close_block(out, HERMES_END)
            else:
                self._open()
            self._inside = not self._inside
        return out

    def _close_block(self, out: ParsedOutput, end: str) -> None:
        """A block whose text is no call object goes back into the content, tags included."""
        text = self._close(out)
        if text is not None:
            out.content += HERMES_START + text + end

    def _emit(self, text: str, out: ParsedOutput) -> None:
        if not text:
            return
        if self._inside:
            self._feed_call(text, out)
        else:
            out.content += text

    def finish(self) -> ParsedOutput:
        out = ParsedOutput()
        rest, self._buffer = self._buffer, ""
        self._emit(rest, out)
        if self._inside:  # an unclosed block (max_tokens): a call if its JSON is complete
            self._inside = False
            self._close_block(out, "")
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def auto_parser(name: str) -> HermesParser | Llama3JsonParser:
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"unknown tool call parser {name!r}; expected one of {TOOL_CALL_PARSERS}")


def parser_for(mode: str, function_name: str | None, auto_name: str):
    """The parser of a tool plan: its mode ("auto" | "required" | "named"), the named function,
    and the --tool-call-parser for "auto"."""
    if mode == "named":
        assert function_name is not None
        return NamedCallParser(function_name)
    if mode == "required":
        return RequiredCallsParser()
    return auto_parser(auto_name)

