"""Every failure of the HTTP API as OpenAI's error body,
``{"error": {"message", "type", "param", "code"}}``, with the right status: mesh errors
(:mod:`services.errors`, each kind knows its status and OpenAI's type and code), and
HTTP-only ones. A stream that fails after its first chunk cannot change its status any
more; :mod:`router_svc.http.sse` sends the same body as an event instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from services.errors import StageError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        """OpenAI's error object (also what a failed stream sends as its last event)."""
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        """The answer: the body, the status, and Retry-After on overload (429/503)."""
        headers = (
            {}
            if self.retry_after is None
            else {hdrs.RETRY_AFTER: str(max(1, round(self.retry_after)))}
        )
        if self.status == HTTPStatus.UNAUTHORIZED:
            headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
        return web.json_response(self.body(), status=int(self.status), headers=headers)


def error_middleware(max_body: int) -> Middleware:
    """The outermost middleware: whatever a handler or another middleware raises is
    answered with OpenAI's body, and an unexpected error is logged with its traceback
    but answered without it (the caller learns nothing of the router's code)."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except StageError as exc:
            return ApiError.from_stage(exc).response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is larger than {max_body} bytes",
            ).response()
        except web.HTTPException as exc:
            return ApiError(HTTPStatus(exc.status), exc.reason).response()
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the router log"
            ).response()

    return errors
