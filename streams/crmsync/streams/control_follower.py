"""The control follower as a supervised Faust service: applies each new control record."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar, Protocol

import mode

from crmsync.streams.control_protocol import ControlRecord
from crmsync.streams.kafka.follower import CompactedTopicFollower
from crmsync.streams.runtime import WorkflowRuntime
from crmsync.targets.retry import backoff

log = logging.getLogger(__name__)


class Followed(Protocol):
    """What the service follows (the app): its control topic follower and runtime."""

    @property
    def control(self) -> CompactedTopicFollower: ...

    @property
    def runtime(self) -> WorkflowRuntime: ...


class ControlService(mode.Service):
    """Applies the control record at start and every change after it.

    A crash of the follower turns the workflow FAILED with the reason (a worker that no longer
    follows the control topic would never apply a Stop), and following starts again, with
    backoff, after the record that crashed it: the next Start is still honoured.
    """

    owner: ClassVar[Followed]

    @property
    def follower(self) -> CompactedTopicFollower:
        return self.owner.control

    @property
    def target(self) -> WorkflowRuntime:
        return self.owner.runtime

    async def on_start(self) -> None:
        await apply(self.target, control_record(self.follower, self.target.name))

    @mode.Service.task
    async def _follow(self) -> None:
        attempt = 0
        while not self.should_stop:
            try:
                async for _ in self.follower.changes():
                    attempt = 0
                    await apply(self.target, control_record(self.follower, self.target.name))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                attempt += 1
                log.exception("event=control_follower_crashed workflow=%s", self.target.name)
                await self.target.fail(
                    f"the control follower crashed: {type(error).__name__}: {error}"
                )
                await self.sleep(backoff(attempt, base_s=0.5, cap_s=10.0))
                await self.follower.restart()
                log.info("event=control_follower_restarted workflow=%s", self.target.name)


async def apply(runtime: WorkflowRuntime, record: ControlRecord | None) -> None:
    """Applies a control record; a failure is reported FAILED, and the worker keeps following
    the control topic so the next Stop/Start is still honoured."""
    try:
        await runtime.apply(record)
    except Exception as error:  # one bad record must not end the control loop
        log.exception("event=control_apply_failed workflow=%s", runtime.name)
        await runtime.fail(
            f"could not apply control generation {record.generation if record else 0}: {error!r}"
        )


def control_record(control: CompactedTopicFollower, workflow: str) -> ControlRecord | None:
    data = control.latest.get(workflow)
    if data is None:
        return None
    try:
        return ControlRecord.decode(data)
    except ValueError as error:
        log.error("event=bad_control_record workflow=%s error=%r", workflow, error)
        return None
