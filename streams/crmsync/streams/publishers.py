"""What a worker publishes besides its writes, through the producer it is handed: DLQ, status
and outcome records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from crmsync.streams import outcomes
from crmsync.streams.control_protocol import WorkerStatus
from crmsync.streams.delivery import Item
from crmsync.streams.kafka import topics

log = logging.getLogger(__name__)


@dataclass
class DeadLetters:
    """Sends refused records to the workflow's DLQ topic with their context headers."""

    producer: AIOKafkaProducer
    workflow: str

    async def send(self, item: Item) -> None:
        assert item.error is not None
        record = item.record
        headers = [
            ("crmsync.workflow", self.workflow),
            ("crmsync.source.topic", record.topic),
            ("crmsync.source.partition", str(record.partition)),
            ("crmsync.source.offset", str(record.offset)),
            ("crmsync.error.class", type(item.error).__name__),
            ("crmsync.error.message", item.error.reason[:2000]),
            ("crmsync.attempts", str(item.attempts)),
            ("crmsync.time", datetime.now(UTC).isoformat()),
        ]
        topic = topics.dead_letters(self.workflow)
        try:
            await self.producer.send_and_wait(
                topic,
                record.value,
                key=record.key,
                headers=[(k, v.encode()) for k, v in headers],
            )
        except (MessageSizeTooLargeError, RecordTooLargeError):
            # Larger than even the dead-letter topic takes: keep the context, point at the
            # original (still in its source topic at the offset above), drop the bytes.
            headers.append(("crmsync.value.omitted", str(len(record.value or b""))))
            await self.producer.send_and_wait(
                topic, b"", key=record.key, headers=[(k, v.encode()) for k, v in headers]
            )
        log.warning(
            "event=dead_lettered workflow=%s topic=%s partition=%s offset=%s error=%r",
            self.workflow,
            record.topic,
            record.partition,
            record.offset,
            item.error.reason,
        )


@dataclass
class StatusReports:
    """Publishes a worker's status + heartbeat to the status topic (a tombstone when it leaves)."""

    producer: AIOKafkaProducer

    async def send(self, status: WorkerStatus, *, left: bool = False) -> None:
        try:
            await self.producer.send_and_wait(
                topics.STATUS, None if left else status.encode(), key=status.key.encode()
            )
        except Exception as error:  # a status that cannot be sent must not stop the data path
            log.warning("event=status_not_sent workflow=%s error=%r", status.workflow, error)


@dataclass
class Outcomes:
    """Publishes one outcome record per batch to the workflow's outcomes topic (the trace).

    Not waited for: the trace is an account of the writes, never a condition of them."""

    producer: AIOKafkaProducer
    workflow: str
    worker: str

    async def send(self, trace: outcomes.OutcomeRecord) -> None:
        if not trace:
            return
        try:
            await self.producer.send(
                topics.outcomes(self.workflow),
                trace.encode(self.workflow, self.worker),
                key=self.worker.encode(),
            )
        except Exception as error:  # e.g. a batch past the size limit: the writes still count
            log.warning("event=outcomes_not_sent workflow=%s error=%r", self.workflow, error)
