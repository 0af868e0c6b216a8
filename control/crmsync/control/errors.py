"""What the control plane refuses, typed by what the caller must do; api.py maps them to HTTP."""

from __future__ import annotations

from typing import Any


class ControlError(Exception):
    """A refused request; `detail` is JSON-ready and shown to the caller."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class BadRequest(ControlError):
    """The request itself is malformed (not JSON, a query parameter of the wrong type)."""


class Unauthenticated(ControlError):
    """No bearer token, or one that is not ours."""


class Forbidden(ControlError):
    """A valid token whose role does not allow the action."""


class UnknownWorkflow(ControlError):
    """No workflow of that name."""


class Conflict(ControlError):
    """The workflow's state does not allow the action now (start while running, ...)."""


class Invalid(ControlError):
    """Well-formed but invalid input; `errors` = [{"loc": [...], "msg": ...}]."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message, errors)
        self.errors = errors


class Unavailable(ControlError):
    """Kafka or the workers did not answer in time; retrying later may work."""
