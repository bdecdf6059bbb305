"""OpenAI's error body for the HTTP bridge: ``{"error": {"message", "type", "param", "code"}}``
with the right status, for mesh errors (:mod:`services.errors`) and HTTP-only ones."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web

from services.errors import StageError


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        code: str | None = None,
        param: str | None = None,
        kind: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.code = code
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        if kind is None and status == HTTPStatus.NOT_FOUND:
            self.kind = "not_found_error"

    @classmethod
    def from_stage(cls, error: StageError) -> ApiError:
        """The answer to a mesh error: everything comes from its kind (services.errors)."""
        return cls(
            error.http_status,
            str(error),
            error.openai_code,
            error.param,
            error.openai_type,
            error.retry_after,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers = (
            {}
            if self.retry_after is None
            else {hdrs.RETRY_AFTER: str(max(1, round(self.retry_after)))}
        )
        if self.status == HTTPStatus.UNAUTHORIZED:
            headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
        return web.json_response(self.body(), status=int(self.status), headers=headers)
