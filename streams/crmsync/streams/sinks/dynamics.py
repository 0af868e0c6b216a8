"""The Dynamics sink: record batches written through the Web API client's `$batch`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from crmsync.streams.sinks.base import (
    Outcome,
    SinkRecord,
    blocks_its_key,
    not_attempted,
    unexpected,
)
from crmsync.targets._http import prefixed
from crmsync.targets._multipart import BatchRequest, ChangeSet
from crmsync.targets.dynamics import (
    BulkUnsupported,
    DynamicsClient,
    Key,
    Write,
    classify,
    parent_missing,
)
from crmsync.targets.errors import Fatal, ParentMissing, RecordRejected, Retryable, SinkError
from crmsync.targets.settings import DynamicsTarget
from crmsync.targets.writes import WriteMode

log = logging.getLogger(__name__)

#: The smallest chunk a batch is split into to fill the client's concurrency: smaller ones
#: would spend Dataverse's request budget (6,000 per user per 5 minutes) for little gain.
MIN_CHUNK_RECORDS = 100


def record_key(record: SinkRecord) -> Key:
    """How a sink record is addressed in a Dataverse URL."""
    if record.alternate_key:
        return record.alternate_key
    if record.key_field:
        return {record.key_field: record.key}
    return record.key


class DynamicsSink:
    """Writes record batches through ``UpsertMultiple`` where it can, else `$batch` with
    ``odata.continue-on-error``.

    Plain upserts (one per key in a batch) go through ``UpsertMultiple``, Microsoft's recommended
    path for throughput, up to 1,000 per call; a table that refuses it, and every other write,
    goes through `$batch`:

    Each record is its own request, so one bad record fails alone. Records sharing a key go in
    successive rounds (one request per key per round), so their order holds even though the
    server runs a batch's requests independently; a record whose key failed retryably or fatally
    holds back the later ones of that key. ``atomic=True`` sends each round as change sets
    instead (all or nothing, at most 1,000 records each): a rejected record is dropped from its
    set and the rest is sent again. Records answered retryably are sent again within the
    client's retry policy, then reported ``Retryable``.
    """

    def __init__(
        self,
        client: DynamicsClient,
        *,
        atomic: bool = False,
        bulk: bool = True,
        min_chunk_records: int = MIN_CHUNK_RECORDS,
    ) -> None:
        self.client = client
        self.atomic = atomic
        self.bulk = bulk and not atomic
        self.min_chunk_records = max(1, min_chunk_records)
        self._no_bulk: set[str] = set()  # entity sets that refused UpsertMultiple

    @classmethod
    def for_target(cls, target: DynamicsTarget, **options: Any) -> DynamicsSink:
        atomic = bool(options.pop("atomic", False))
        bulk = bool(options.pop("bulk", True))
        least = int(options.pop("min_chunk_records", MIN_CHUNK_RECORDS))
        return cls(
            DynamicsClient(target, **options), atomic=atomic, bulk=bulk, min_chunk_records=least
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def hold(self) -> None:
        self.client.hold()

    def release(self) -> None:
        self.client.release()

    async def write_batch(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        """Outcomes of a batch, written as chunks side by side, as many as the client has
        concurrency for: one bulk call (or `$batch`) carries a batch's latency only once, but a
        batch in one request leaves every other slot idle. A key's records all go in one
        chunk, in order, so per-key order holds; an atomic sink keeps its batch whole."""
        ways = 1 if self.atomic else self.client.concurrency
        chunks = key_chunks(records, ways, self.min_chunk_records)
        if len(chunks) <= 1:
            return await self._write_chunk(records)
        outcomes: list[Outcome] = [None] * len(records)

        async def write(indices: list[int]) -> None:
            written = await self._write_chunk([records[i] for i in indices])
            for index, outcome in zip(indices, written, strict=True):
                outcomes[index] = outcome

        await asyncio.gather(*(write(chunk) for chunk in chunks))
        return outcomes

    async def _write_chunk(self, records: Sequence[SinkRecord]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(records)
        rest = await self._write_bulk(records, outcomes) if self.bulk else range(len(records))
        queues: dict[tuple[str, str], list[int]] = {}
        for index in rest:
            queues.setdefault(records[index].identity, []).append(index)
        blocked: dict[tuple[str, str], SinkError] = {}
        # A record with create_fields is two steps: a create-only PATCH with them, then (when the
        # record existed: 412) a PATCH of its other fields, sent in the next round.
        updates: dict[int, BatchRequest] = {}
        while True:
            round_ = [queue[0] for queue in queues.values() if queue]
            if not round_:
                return outcomes
            requests: dict[int, BatchRequest] = {}
            for index in round_:
                record = records[index]
                cause = blocked.get(record.identity)
                if cause is not None:
                    outcomes[index] = not_attempted(record, cause)
                elif index in updates:
                    requests[index] = updates.pop(index)
                    continue
                else:
                    try:
                        request = await self._request(self._first_write(record))
                    except SinkError as error:
                        outcomes[index] = error
                    except Exception as error:  # a request one record cannot make is its own
                        outcomes[index] = RecordRejected(f"cannot build the request: {error!r}")
                    else:
                        if request is not None:
                            requests[index] = request
                            continue
                        outcomes[index] = None
                queues[record.identity].pop(0)
            try:
                written = await self._write_round(requests)
            except Exception as error:  # a bug must not lose records: report them, stop the flow
                log.exception("dynamics sink failed unexpectedly")
                written = {i: (unexpected(error), 0) for i in requests}
            for index, (outcome, status) in written.items():
                record = records[index]
                outcomes[index] = outcome
                then = None
                if status == 412 and _mode_of(requests[index]) != record.mode:
                    then = self.client.then_write(
                        record.target, record_key(record), record.fields, record.mode
                    )
                if then is not None:
                    try:
                        second = await self._request(then)
                    except SinkError as error:
                        outcomes[index] = outcome = error
                    else:
                        if second is not None:
                            updates[index] = second
                            continue  # the record stays first in its queue for its second step
                queues[record.identity].pop(0)
                if blocks_its_key(outcome):
                    assert outcome is not None
                    blocked[record.identity] = outcome

    async def _write_bulk(
        self, records: Sequence[SinkRecord], outcomes: list[Outcome]
    ) -> list[int]:
        """Plain upserts (one per key in the batch) through ``UpsertMultiple``, up to 1,000 per
        call; the indices left for `$batch`: everything else, a call the table refused (then
        never tried again for it), and a call one bad record failed (all or none: `$batch`
        finds which)."""
        per_key = Counter(r.identity for r in records)
        groups: dict[str, list[int]] = {}
        rest: list[int] = []
        for index, record in enumerate(records):
            plain = record.op == "upsert" and record.mode == "upsert" and not record.create_fields
            if plain and per_key[record.identity] == 1 and record.target not in self._no_bulk:
                groups.setdefault(record.target, []).append(index)
            else:
                rest.append(index)
        size = self.client.max_batch_requests

        async def write(entity_set: str, chunk: list[int]) -> None:
            items = [(record_key(records[i]), records[i].fields) for i in chunk]
            try:
                await self.client.upsert_multiple(entity_set, items)
            except BulkUnsupported as error:
                log.info("dynamics bulk refused entity_set=%s reason=%s", entity_set, error)
                self._no_bulk.add(entity_set)
                rest.extend(chunk)
            except (RecordRejected, ParentMissing):
                rest.extend(chunk)
            except SinkError as error:
                for i in chunk:
                    outcomes[i] = error
            except Exception as error:  # a bug must not lose records: report them, stop the flow
                log.exception("dynamics bulk write failed unexpectedly")
                for i in chunk:
                    outcomes[i] = unexpected(error)

        await asyncio.gather(
            *(
                write(entity_set, indices[start : start + size])
                for entity_set, indices in groups.items()
                for start in range(0, len(indices), size)
            )
        )
        return sorted(rest)

    async def _write_round(
        self, requests: Mapping[int, BatchRequest]
    ) -> dict[int, tuple[Outcome, int]]:
        """Outcomes (and statuses) of requests on distinct keys; transient failures retried
        within the policy. A missing parent (``ParentMissing``) is not retried here: the runtime
        parks it."""
        policy = self.client.retry
        outcomes: dict[int, tuple[Outcome, int]] = {}
        todo = dict(requests)
        modes = {i: _mode_of(r) for i, r in requests.items()}
        attempt, started = 1, time.monotonic()
        while todo:
            indices = list(todo)
            try:
                answers = await self.client.batch(self._items([todo[i] for i in indices]))
            except SinkError as error:
                outcomes.update(dict.fromkeys(indices, (error, 0)))
                return outcomes
            retry: dict[int, BatchRequest] = {}
            waits: list[float] = []
            rejected_in_set = False
            for index, answer in zip(indices, answers, strict=True):
                request = todo[index]
                outcome = classify(
                    answer.status,
                    answer.body,
                    answer.headers,
                    operation="delete" if request.method == "DELETE" else "write",
                    mode=modes[index],
                )
                if isinstance(outcome, RecordRejected) and request.method == "PATCH":
                    outcome = (
                        parent_missing(answer.status, answer.body, request.body, modes[index])
                        or outcome
                    )
                if isinstance(outcome, Retryable) and not isinstance(outcome, ParentMissing):
                    retry[index] = request
                    if outcome.retry_after:
                        waits.append(outcome.retry_after)
                    if answer.status == 429:
                        self.client.pause(outcome.retry_after)
                elif outcome is not None:
                    rejected_in_set |= self.atomic and not isinstance(outcome, Fatal)
                written = None if outcome is None else prefixed(outcome, _what(request))
                outcomes[index] = (written, answer.status)
            todo = retry
            if not todo or rejected_in_set:
                continue  # an atomic set failed for a record now dropped: resend the rest at once
            wait = max(waits) if waits else policy.backoff(attempt)
            if attempt >= policy.attempts or time.monotonic() - started + wait > policy.budget_s:
                break
            await asyncio.sleep(wait)
            attempt += 1
        return outcomes

    async def _request(self, write: Write) -> BatchRequest | None:
        """The request of a write; a key a URL cannot carry is resolved first (None: nothing
        to do, a delete of a record already gone)."""
        resolved = await self.client.addressable(write)
        if isinstance(resolved, SinkError):
            raise resolved
        return None if resolved is None else self.client.write_request(resolved)

    def _first_write(self, record: SinkRecord) -> Write:
        fields = None if record.op == "delete" else record.fields
        return self.client.first_write(
            record.target,
            record_key(record),
            fields,
            mode=record.mode,
            create_fields=record.create_fields,
        )

    def _items(self, requests: list[BatchRequest]) -> list[BatchRequest | ChangeSet]:
        if not self.atomic:
            return list(requests)
        size = self.client.max_batch_requests
        return [ChangeSet(requests[i : i + size]) for i in range(0, len(requests), size)]


def key_chunks(records: Sequence[SinkRecord], ways: int, least: int) -> list[list[int]]:
    """The indices of ``records`` in at most ``ways`` chunks of about equal size, none smaller
    than ``least`` records (but a batch smaller than that): every record of a key in the same
    chunk, in their order, keys in the order they first appear."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, record in enumerate(records):
        by_key.setdefault(record.identity, []).append(index)
    ways = max(1, min(ways, len(records) // max(1, least)))
    if ways == 1:
        return [list(range(len(records)))] if records else []
    chunks: list[list[int]] = [[]]
    placed = 0
    for indices in by_key.values():
        # Chunk k ends once k+1 shares of the batch are placed: sizes differ by a key at most.
        if chunks[-1] and placed * ways >= len(chunks) * len(records) and len(chunks) < ways:
            chunks.append([])
        chunks[-1].extend(indices)
        placed += len(indices)
    return chunks


def _mode_of(request: BatchRequest) -> WriteMode:
    if request.method == "POST" or request.headers.get("If-None-Match") == "*":
        return "create"
    if request.headers.get("If-Match") == "*":
        return "update"
    return "upsert"


def _what(request: BatchRequest) -> str:
    return f"{request.method} {request.url}"
