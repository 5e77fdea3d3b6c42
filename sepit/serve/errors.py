"""API errors and their JSON form.

Every error the endpoint returns has OpenAI's shape, so standard clients surface the message::

    {"error": {"message": "...", "type": "limit_exceeded", "param": "max_residues", "code": 422}}

``param`` names the offending field or the limit that was hit.
"""

from __future__ import annotations

from typing import Optional

from sepit.errors import SepitError


class ApiError(SepitError):
    """An error answered to the client with ``status`` and a JSON body (never a traceback)."""

    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, param: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


class InvalidInput(ApiError):
    """Well-formed JSON whose content is unusable (bad alphabet, unparsable structure, ...)."""

    status = 422
    type = "invalid_request_error"


class Unsupported(ApiError):
    """A well-formed OpenAI field whose value this server cannot honour (``n`` > 1, ``logprobs``,
    ``tools``, a JSON ``response_format``): refused with 400 rather than silently ignored."""

    status = 400
    type = "invalid_request_error"


class LimitExceeded(ApiError):
    """A request over a configured limit; ``param`` is the limit's name in ``limits``."""

    type = "limit_exceeded"

    def __init__(self, limit: str, value: int, maximum: int, what: str, status: int = 422):
        super().__init__(f"{what} is {value}, over the limit {limit}={maximum}", param=limit, status=status)
        self.limit, self.value, self.maximum = limit, value, maximum

    def body(self) -> dict:
        out = super().body()
        out["error"]["limit"] = {"name": self.limit, "value": self.value, "maximum": self.maximum}
        return out


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class RequestTimeout(ApiError):
    status = 504
    type = "timeout"


class NotReady(ApiError):
    status = 503
    type = "service_unavailable"


def error_body(message: str, type_: str, param: Optional[str], status: int) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}
