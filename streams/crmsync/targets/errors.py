"""Write failures, typed by what the caller must do: retry, dead-letter the record, or stop."""

from __future__ import annotations


class SinkError(Exception):
    """Base of every classified failure a sink reports."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Retryable(SinkError):
    """A transient failure (throttling, timeouts, 5xx outages): retry later, skip nothing.

    ``retry_after`` is the delay in seconds the target asked for, when it said one.
    """

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Halted(Retryable):
    """Not sent: the client was told to start no new request (its workflow is stopping, or a
    rebalance is fencing it off); the record is written again once the workflow runs."""


class RecordRejected(SinkError):
    """The target refused this one record (or it cannot be decoded or mapped): dead-letter it."""


class Fatal(SinkError):
    """The workflow cannot go on (credentials refused, forbidden, entity missing, bad config).

    The workflow goes FAILED and does not advance its offsets past unwritten records.
    """


class NotFound(Fatal):
    """The URL names nothing: a table, resource or filter the target does not have (404).

    Writing through it is Fatal like any other; a metadata check reads it as "missing", where
    any other Fatal (credentials refused, forbidden) means the target could not be read."""


class ParentMissing(Retryable):
    """The record links to a parent (a contact or profile) the target does not have yet.

    It usually arrives soon through another workflow, so the runtime retries it for a bounded
    time before dead-lettering it, instead of failing the workflow.
    """
