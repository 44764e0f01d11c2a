"""OpenAI-style HTTP errors: one exception type and the `{"error": {...}}` body clients parse.

The `openai` SDK picks its exception class from the HTTP status alone (BadRequestError,
NotFoundError, RateLimitError, ...) and keeps `message`, `type`, `param` and `code` from the body,
so the status is what must be right; `type` follows what api.openai.com itself sends:

| status | type                  | default code          | when                                   |
|--------|-----------------------|-----------------------|----------------------------------------|
| 400    | invalid_request_error | null                  | malformed JSON, out-of-range values    |
| 401    | invalid_request_error | "invalid_api_key"     | missing or wrong API key               |
| 404    | invalid_request_error | null                  | unknown route; "model_not_found"       |
|        |                       |                       | (param "model") for a model not served |
| 413    | invalid_request_error | null                  | request body or prompt too large       |
| 422    | invalid_request_error | null                  | wrong JSON type, missing field         |
| 429    | requests              | "rate_limit_exceeded" | admission queue full                   |
| 500    | server_error          | null                  | a stage failed                         |
| 503    | server_error          | "service_unavailable" | not ready yet, or shutting down        |

Any other 4xx is an `invalid_request_error` and any other 5xx a `server_error`. (vLLM writes
Python-ish names such as "BadRequestError" and an integer code; OpenAI's strings are what the
SDK's docs show, and no client we target branches on `type`.)
"""

from __future__ import annotations

from typing import Any

from protocol.messages import RequestFailed

_TYPE_BY_STATUS: dict[int, str] = {429: "requests"}
_DEFAULT_CODE: dict[int, str] = {
    401: "invalid_api_key",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status (see the table above)."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    status: int,
    message: str,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`; type and code default by status."""
    return {
        "error": {
            "message": message,
            "type": type if type is not None else error_type(status),
            "param": param,
            "code": code if code is not None else _DEFAULT_CODE.get(status),
        }
    }


class APIError(Exception):
    """A request the gateway answers with an error status instead of a completion."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type if type is not None else error_type(status)
        self.param = param
        self.code = code if code is not None else _DEFAULT_CODE.get(status)
        self.retry_after = retry_after  # seconds, for a 429's Retry-After headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.type, self.param, self.code)

    @classmethod
    def from_request_failed(cls, failed: RequestFailed) -> APIError:
        """A tokenizer/scheduler rejection (`RequestFailed`) as the error the client sees."""
        return cls(failed.status, failed.message, param=failed.param, code=failed.code)

    def __repr__(self) -> str:
        return (f"APIError({self.status}, {self.message!r}, param={self.param!r}, "
                f"code={self.code!r})")
