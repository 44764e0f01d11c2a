"""A thin tokenizer over a transformers fast tokenizer, returning plain Python ids.

The serving pipeline passes token ids between processes, so everything here returns
``list[int]`` / ``str`` and validates chat messages up front with a clear ValueError instead
of a template error from deep inside jinja.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

HERMES_TOOLS_TEMPLATE = Path(__file__).with_name("templates") / "hermes_tools.jinja"
_PROBE_TOOL = {"type": "function", "function": {"name": "pdserve_probe_tool_7f3a", "parameters": {
    "type": "object", "properties": {}}}}


class Tokenizer:
    """Encode prompts / chat messages and decode ids for one model directory."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], name: str) -> None:
        self._tok = hf_tokenizer
        self._eos_token_ids = list(eos_token_ids)
        self._name = name
        self._tools_template: str | None = None  # decided on the first request with tools

    @classmethod
    def from_dir(cls, path: Path | str, name: str | None = None,
                 chat_template: Path | str | None = None) -> "Tokenizer":
        """Load the tokenizer files of a Hugging Face directory (``name`` defaults to its name);
        ``chat_template`` is a Jinja file that replaces the model's own template."""
        path = Path(path)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
        if chat_template is not None:
            hf_tokenizer.chat_template = Path(chat_template).expanduser().read_text(encoding="utf-8")
        eos = _ordered_unique(_generation_eos_ids(path) + _as_id_list(hf_tokenizer.eos_token_id))
        return cls(hf_tokenizer, eos, name if name is not None else path.name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        """The wrapped transformers tokenizer, for callers that need its token-level API."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added special tokens included."""
        return len(self._tok)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: generation_config.json's eos ids, then the tokenizer's."""
        return list(self._eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """Ids of a plain completion prompt, with the tokenizer's default special tokens."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=True))

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Ids of ``messages`` rendered by the model's chat template, ending in the prompt for
        the assistant's reply. With ``tools``, a template that does not render them is replaced
        by the bundled Hermes-style one (`tools_template`)."""
        _validate_messages(messages)
        if not self._tok.chat_template:
            raise ValueError(f"tokenizer {self._name!r} has no chat template; send a plain prompt instead")
        template = self.tools_template() if tools or _has_tool_turns(messages) else None
        try:
            rendered = self._tok.apply_chat_template(
                messages, tools=tools or None, chat_template=template, add_generation_prompt=True,
                tokenize=True, return_dict=False,
            )
        except jinja2.TemplateError as exc:  # e.g. the template rejects the role order
            raise ValueError(f"chat template rejected the messages: {exc}") from exc
        if isinstance(rendered, Mapping):
            rendered = rendered["input_ids"]
        return [int(token) for token in rendered]

    def tools_template(self) -> str | None:
        """None when the chat template renders tools (a probe tool's name shows up in the
        prompt); otherwise the bundled Hermes-style template, which the log announces once."""
        if self._tools_template is None:
            messages = [{"role": "user", "content": "hi"}]
            try:
                probe = self._tok.apply_chat_template(messages, tools=[_PROBE_TOOL], tokenize=False,
                                                      add_generation_prompt=True)
            except jinja2.TemplateError:
                probe = ""
            renders = _PROBE_TOOL["function"]["name"] in str(probe)
            self._tools_template = "" if renders else HERMES_TOOLS_TEMPLATE.read_text(encoding="utf-8")
            if not renders:
                log.info("the chat template of %s does not render tools: requests with tools use "
                         "pdserve's Hermes-style template (%s); --chat-template FILE overrides",
                         self._name, HERMES_TOOLS_TEMPLATE.name)
        return self._tools_template or None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _validate_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}] needs a non-empty string 'role'")
        if "content" not in message:
            raise ValueError(f"messages[{index}] has no 'content'")
        if message["content"] is None and message.get("tool_calls"):
            continue  # an assistant turn that only called tools
        if not isinstance(message["content"], str):
            raise ValueError(
                f"messages[{index}].content must be a string, got {type(message['content']).__name__}"
            )


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def _generation_eos_ids(path: Path) -> list[int]:
    generation_config = path / "generation_config.json"
    if not generation_config.is_file():
        return []
    return _as_id_list(json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id"))


def _ordered_unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))
