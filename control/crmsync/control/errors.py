"""What the control plane refuses, typed by what the caller must do; each kind carries its HTTP
status and error code, read by the API and the page alike (the one mapping, as Kafka Connect's
`ConnectRestException` does)."""

from __future__ import annotations

from typing import Any, ClassVar


class ControlError(Exception):
    """A refused request; `detail` is JSON-ready and shown to the caller."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Headers the answer carries besides the body (a challenge, a wait)."""
        return {}


class BadRequest(ControlError):
    """The request itself is malformed (not JSON, a query parameter of the wrong type)."""

    status, code = 400, "bad_request"


class Unauthenticated(ControlError):
    """No bearer token, or one that is not ours."""

    status, code = 401, "unauthenticated"

    def __init__(self, message: str, detail: Any = None, *, invalid_token: bool = False) -> None:
        super().__init__(message, detail)
        self.invalid_token = invalid_token

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="crmsync"'
        if self.invalid_token:
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


class Forbidden(ControlError):
    """A valid token whose role does not allow the action."""

    status, code = 403, "forbidden"


class UnknownWorkflow(ControlError):
    """No workflow of that name."""

    status, code = 404, "unknown_workflow"


class Conflict(ControlError):
    """The workflow's state does not allow the action now (start while running, ...)."""

    status, code = 409, "conflict"


class Invalid(ControlError):
    """Well-formed but invalid input; `errors` = [{"loc": [...], "msg": ...}]."""

    status, code = 422, "invalid"

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message, errors)
        self.errors = errors


class TooManyAttempts(ControlError):
    """Too many failed sign-ins or bearer tokens from one client: wait, then retry."""

    status, code = 429, "too_many_attempts"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, {"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unavailable(ControlError):
    """Kafka or the workers did not answer in time; retrying later may work."""

    status, code = 503, "unavailable"
