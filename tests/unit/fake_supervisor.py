"""A `Supervisor` without Kafka for the control plane's unit tests: every workflow running."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from crmsync.control import models
from crmsync.control.auth import Principal
from crmsync.control.dead_letters import DeadLetterFilter, RedriveAnswer, RedriveBody
from crmsync.control.errors import Conflict, ControlError, Invalid, UnknownWorkflow
from crmsync.control.history import HistoryAnswer, HistoryEta
from crmsync.control.server import SupervisorFactory
from crmsync.control.sources import SourceList
from crmsync.control.supervisor_protocol import Figures, Supervisor
from crmsync.streams import catalog
from crmsync.streams import config as configs
from crmsync.streams.preflight import Requirement
from crmsync.streams.settings import Settings


class FakeSupervisor:
    """Records the actions; `refuse` makes every call raise that error instead."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, str, str]] = []
        self.refuse: ControlError | None = None

    def _check(self, name: str | None = None) -> None:
        if self.refuse is not None:
            raise self.refuse
        if name is not None and name not in catalog.NAMES:
            raise UnknownWorkflow(f"no workflow named {name!r}")

    def _summary(self, name: str) -> models.WorkflowSummary:
        return models.WorkflowSummary(
            name=name, title=name, status="RUNNING", backlog=0, trend="caught_up",
            pending_changes=False, error=None,
        )  # fmt: skip

    async def summaries(self) -> list[models.WorkflowSummary]:
        self._check()
        return []

    async def summary(self, name: str) -> models.WorkflowSummary:
        self._check(name)
        return self._summary(name)

    async def detail(self, name: str) -> models.WorkflowDetail:
        self._check(name)
        return models.WorkflowDetail(
            **self._summary(name).model_dump(), desired="running", generation=1, partitions=[],
            active_config={}, active_version=1, pending_config=None, pending_version=None,
            pending_diff=[], workers=[], updated_at="2026-01-01T00:00:00+00:00", updated_by="admin",
        )  # fmt: skip

    def config(self, name: str) -> models.ConfigAnswer:
        self._check(name)
        return models.ConfigAnswer(
            active={}, active_version=1, pending=None, pending_version=None, pending_diff=[]
        )

    def figures(self) -> list[Figures]:
        return []

    async def dead_letters(self, name: str, limit: int) -> models.DeadLetterList:
        self._check(name)
        return models.DeadLetterList(workflow=name, dead_letters=[])

    async def dead_letter_listing(
        self, name: str, where: DeadLetterFilter, limit: int
    ) -> models.DeadLetterList:
        self._check(name)
        return models.DeadLetterList(workflow=name, dead_letters=[])

    async def redrive(self, name: str, body: RedriveBody, who: Principal) -> RedriveAnswer:
        self._check(name)
        self.actions.append(("redrive", name, who.name))
        return RedriveAnswer(
            workflow=name, redrive_id=None if body.dry_run else "r1", dry_run=body.dry_run,
            matched=0, redriven=[], skipped=[], complete=True,
        )  # fmt: skip

    def sources(self) -> SourceList:
        self._check()
        return SourceList(sources=[])

    def history(self, name: str, span_s: float = 3600.0) -> HistoryAnswer:
        self._check(name)
        eta = HistoryEta(trend="unknown", eta_s=None, text="no samples yet")
        return HistoryAnswer(workflow=name, since=0, sample_interval_s=5, eta=eta, samples=[])

    async def audit(self, limit: int) -> models.AuditList:
        self._check()
        return models.AuditList(audit=[])

    async def trace(self, key: str) -> models.TraceAnswer:
        self._check()
        return models.TraceAnswer(key=key, events=[], truncated=False, not_indexed_yet=0)

    async def preview(
        self, name: str, config: Mapping[str, Any] | None, limit: int
    ) -> models.PreviewAnswer:
        self._check(name)
        if config is not None:
            try:
                catalog.parse_config(name, config)  # the supervisor's own validation
            except configs.ConfigError as error:
                errors = [{**e, "loc": ["config", *e["loc"]]} for e in error.errors]
                raise Invalid("invalid config", errors) from None
        return models.PreviewAnswer(
            workflow=name, pending_source="body" if config is not None else "active",
            active_version=1, pending_version=None, records=[], changed=0, dropped=0, kept=0,
            complete=True, note=None,
        )  # fmt: skip

    async def targets(self) -> list[Requirement]:
        self._check()
        return []

    async def ready(self) -> None:
        self._check()

    async def start_workflow(self, name: str, who: Principal) -> models.StatusAnswer:
        self._check(name)
        self.actions.append(("start", name, who.name))
        return models.StatusAnswer(name=name, status="STARTING", generation=2)

    async def stop_workflow(self, name: str, who: Principal) -> models.StatusAnswer:
        self._check(name)
        self.actions.append(("stop", name, who.name))
        return models.StatusAnswer(name=name, status="STARTING", generation=2)

    async def edit_config(
        self, name: str, data: Mapping[str, Any], who: Principal
    ) -> models.PendingAnswer:
        self._check(name)
        try:
            parsed = catalog.parse_config(name, data)  # the supervisor's own validation
        except configs.ConfigError as error:
            raise Invalid("invalid config", error.errors) from None
        self.actions.append(("edit", name, who.name))
        pending = configs.redacted(parsed)
        return models.PendingAnswer(pending=pending, pending_version=2, pending_diff=[])

    async def replay(self, name: str, from_: str, who: Principal) -> models.ReplayAnswer:
        self._check(name)
        raise Conflict(f"{name} is RUNNING: stop it before a replay")


def factory(fake: FakeSupervisor) -> SupervisorFactory:
    """A `SupervisorFactory` that hands out `fake` (checked against the protocol by mypy)."""
    supervisor: Supervisor = fake

    @contextlib.asynccontextmanager
    async def make(settings: Settings) -> AsyncIterator[Supervisor]:
        yield supervisor

    return make
