"""What the HTTP API, the web page and `crmsync control` need of a supervisor (Kafka Connect's
`Herder`): one interface, so a route never reaches into Kafka and a test fake is a plain class."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from crmsync.control import models
from crmsync.control.auth import Principal
from crmsync.control.dead_letters import DeadLetterFilter, RedriveAnswer, RedriveBody
from crmsync.control.history import HistoryAnswer
from crmsync.control.sources import SourceList
from crmsync.streams.preflight import Requirement


@dataclass(frozen=True)
class Figures:
    """What /metrics shows of one workflow, from what the supervisor already holds."""

    name: str
    status: str
    backlog: int | None
    pending_changes: bool
    live_workers: int
    records_written: int  # Σ over the workers reporting (each counts since its own start)
    dead_lettered: int


class Supervisor(Protocol):
    """Status, backlog, config and actions of every workflow; refusals are `ControlError`s."""

    async def summaries(self) -> list[models.WorkflowSummary]: ...

    async def summary(self, name: str) -> models.WorkflowSummary: ...

    async def detail(self, name: str) -> models.WorkflowDetail: ...

    def config(self, name: str) -> models.ConfigAnswer: ...

    def figures(self) -> list[Figures]: ...

    async def dead_letters(self, name: str, limit: int) -> models.DeadLetterList: ...

    async def dead_letter_listing(
        self, name: str, where: DeadLetterFilter, limit: int
    ) -> models.DeadLetterList:
        """The newest dead letters matching `where`, each marked when it was re-driven."""

    async def redrive(self, name: str, body: RedriveBody, who: Principal) -> RedriveAnswer:
        """Sends the matching dead letters not re-driven yet through the workflow again."""

    def sources(self) -> SourceList: ...

    def history(self, name: str, span_s: float = ...) -> HistoryAnswer: ...

    async def audit(self, limit: int) -> models.AuditList: ...

    async def trace(self, key: str) -> models.TraceAnswer:
        """Every event that carried `key` and what each workflow did with it, newest first."""

    async def preview(
        self, name: str, config: Mapping[str, Any] | None, limit: int
    ) -> models.PreviewAnswer:
        """What the active and the given (else the pending) config would write for the newest
        `limit` source records; writes nothing. An invalid config is `Invalid` (loc "config")."""

    async def targets(self) -> list[Requirement]:
        """What each workflow's active config needs in the targets: present, or missing."""

    async def ready(self) -> None:
        """Returns when Kafka answers and the control topics are read; else `Unavailable`."""

    async def start_workflow(self, name: str, who: Principal) -> models.StatusAnswer: ...

    async def stop_workflow(self, name: str, who: Principal) -> models.StatusAnswer: ...

    async def edit_config(
        self, name: str, data: Mapping[str, Any], who: Principal
    ) -> models.PendingAnswer: ...

    async def replay(self, name: str, from_: str, who: Principal) -> models.ReplayAnswer: ...
