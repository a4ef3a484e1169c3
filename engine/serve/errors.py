"""Typed errors of the service: each becomes a JSON response {"error": one line naming the field}
with its HTTP status (engine/serve/app.py). Anything else is a bug: the client gets a 500 with no
traceback and the server logs it."""

from engine.errors import BssanError


class RequestError(BssanError):
    """A request the service refuses; `status` is the HTTP status code sent back."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(RequestError):
    status = 404


class Unauthorized(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


class TooLarge(RequestError):
    status = 413


class Unsupported(RequestError):
    status = 415
