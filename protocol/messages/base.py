"""What every message is built from: the two struct bases and the enums several families share.

`_Msg` is a tagged message (a socket's union tells them apart by tag), `_Part` an untagged part
nested inside one; both are `array_like` (see `protocol.messages` for the wire rules).
"""

from __future__ import annotations

import enum

import msgspec


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    """Base of tagged messages: the tag is the class name unless a subclass sets its own."""


class _Part(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base of untagged parts nested inside messages."""


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token or a stop string
    LENGTH = 1  # max_tokens or the context length
    ABORT = 2  # the client went away or asked
    ERROR = 3  # something failed; RequestOutput.error says what

    @property
    def openai_name(self) -> str:
        return {0: "stop", 1: "length", 2: "abort", 3: "error"}[int(self)]


class WorkerRole(enum.IntEnum):
    MIXED = 0  # prefill and decode
    PREFILL = 1  # prefill only; hands KV blocks to a decode worker (disaggregation)
    DECODE = 2  # decode only; receives KV blocks
