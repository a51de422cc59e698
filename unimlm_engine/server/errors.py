"""OpenAI-style API errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""
from __future__ import annotations

from typing import Optional

from ..engine.types import (EngineClosedError, EngineError, InvalidRequestError, QueueFullError)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine(error: Optional[BaseException], finish_reason: Optional[str], retry_after_s: int = 1) -> APIError:
    """A request that ended without a result (finish_reason error, timeout or cancelled) -> its API error."""
    if finish_reason == "timeout":
        # 408 is what clients retry on their own (openai-python does); the work was done and timed out, so
        # tell them not to: x-should-retry is honoured by openai-python
        return APIError(408, "the request timed out (its timeout or the server's --request-timeout)",
                        type="timeout_error", code="request_timeout", headers={"x-should-retry": "false"})
    if finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", type="server_error",
                        code="cancelled")
    if isinstance(error, QueueFullError):
        return APIError(429, f"the server is at capacity: {error}", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(error, EngineClosedError):
        return APIError(503, f"the server is shutting down: {error}", type="server_error", code="shutting_down")
    if isinstance(error, (InvalidRequestError, ValueError)):
        return bad_request(f"{type(error).__name__}: {error}")
    if isinstance(error, EngineError):
        return APIError(500, f"{type(error).__name__}: {error}", type="server_error", code="engine_error")
    return APIError(500, f"{type(error).__name__}: {error}" if error else "the request failed",
                    type="server_error", code="internal_error")
