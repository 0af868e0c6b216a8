"""The Campaign sink: record batches written concurrently through the REST client, key by key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from crmsync.streams.sinks.base import (
    Outcome,
    SinkRecord,
    blocks_its_key,
    not_attempted,
    unexpected,
)
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.errors import SinkError
from crmsync.targets.settings import CampaignTarget

log = logging.getLogger(__name__)


class CampaignSink:
    """Writes record batches to Campaign: it has no batch endpoint, so records go concurrently.

    Before a batch is written the client hears which keys it holds: a large load of keys it
    has no PKey for warms its cache by paging the resource rather than looking each one up.
    Concurrency is capped by the client (``max_concurrency``); records with the same
    ``(target, key)`` go one after the other in the order given, and a record whose key failed
    retryably or fatally holds back the later ones of that key.
    """

    def __init__(self, client: CampaignClient) -> None:
        self.client = client

    @classmethod
    def for_target(cls, target: CampaignTarget, **options: Any) -> CampaignSink:
        return cls(CampaignClient(target, **options))

    async def aclose(self) -> None:
        await self.client.aclose()

    def hold(self) -> None:
        self.client.hold()

    def release(self) -> None:
        self.client.release()

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        await self._expect(records)
        outcomes: list[Outcome] = [None] * len(records)
        chains: dict[tuple[str, str], list[int]] = {}
        for index, record in enumerate(records):
            chains.setdefault(record.identity, []).append(index)

        async def write_chain(indices: list[int]) -> None:
            cause: SinkError | None = None
            for index in indices:
                record = records[index]
                if cause is not None:
                    outcomes[index] = not_attempted(record, cause)
                    continue
                outcomes[index] = outcome = await self.write(record)
                if blocks_its_key(outcome):
                    cause = outcome

        await asyncio.gather(*(write_chain(chain) for chain in chains.values()))
        return outcomes

    async def _expect(self, records: Sequence[SinkRecord]) -> None:
        """Tells the client which keys are about to be written, so that a large load warms its
        PKey cache by paging (one request per 1,000 records) instead of a lookup per record."""
        keys: dict[tuple[str, str | None], set[str]] = {}
        for record in records:
            if record.op == "upsert":
                keys.setdefault((record.target, record.key_field), set()).add(record.key)
        for (resource, key_field), values in keys.items():
            try:
                await self.client.expect(resource, values, key_field=key_field)
            except SinkError as error:  # the writes look their records up one by one instead
                log.warning(
                    "event=campaign_cache_warm_failed resource=%s error=%s", resource, error
                )

    async def write(self, record: SinkRecord) -> Outcome:
        """One record's outcome (never raises but for cancellation)."""
        try:
            if record.op == "delete":
                await self.client.delete(record.target, record.key, key_field=record.key_field)
            else:
                await self.client.upsert(
                    record.target,
                    record.key,
                    record.fields,
                    key_field=record.key_field,
                    create_fields=record.create_fields,
                    mode=record.mode,
                )
        except SinkError as error:
            return error
        except Exception as error:  # a bug must not lose the record: report it, stop the flow
            log.exception("campaign sink failed unexpectedly")
            return unexpected(error)
        return None
