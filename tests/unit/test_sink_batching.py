"""Sink semantics without a network: one outcome per record, per-key order, partial failures."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from crmsync.streams.sinks.base import BatchingSink, DiscardingSink, SinkRecord, retry_after
from crmsync.streams.sinks.campaign import CampaignSink
from crmsync.streams.sinks.dynamics import DynamicsSink
from crmsync.targets._http import RetryPolicy
from crmsync.targets._multipart import BatchRequest, BatchResponse, ChangeSet
from crmsync.targets.dynamics import BulkUnsupported, DynamicsClient, Key
from crmsync.targets.errors import Fatal, ParentMissing, RecordRejected, Retryable, SinkError
from crmsync.targets.settings import DynamicsTarget

FAST = RetryPolicy(attempts=3, budget_s=5, backoff_base_s=0.01, backoff_cap_s=0.02)
Answer = Callable[[BatchRequest], tuple[int, str]]


def ok(_: BatchRequest) -> tuple[int, str]:
    return 204, ""


def error(status: int, message: str = "no") -> tuple[int, str]:
    return status, json.dumps({"error": {"code": "0x1", "message": message}})


class ScriptedDynamics(DynamicsClient):
    """A Dynamics client whose `$batch` answers come from a function instead of a server."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(DynamicsTarget(url="http://127.0.0.1:9"), retry=FAST)
        self.answer = answer
        self.batches: list[list[BatchRequest | ChangeSet]] = []

    async def upsert_multiple(
        self, entity_set: str, items: Sequence[tuple[Key, Mapping[str, Any]]]
    ) -> None:
        raise BulkUnsupported("scripted: the $batch path only")  # the sink falls back

    async def batch(
        self, items: Sequence[BatchRequest | ChangeSet], *, continue_on_error: bool = True
    ) -> list[BatchResponse]:
        self.batches.append(list(items))
        responses: list[BatchResponse] = []
        for item in items:
            if isinstance(item, ChangeSet):
                answers = [self.answer(r) for r in item.requests]
                failed = [a for a in answers if a[0] >= 400]
                if failed:  # a failed change set: everything rolled back
                    bad = answers.index(failed[0])
                    for n, _ in enumerate(item.requests):
                        status, body = failed[0] if n == bad else (424, "")
                        responses.append(BatchResponse(status, {}, body))
                    continue
                responses += [BatchResponse(s, {}, b) for s, b in answers]
            else:
                status, body = self.answer(item)
                responses.append(BatchResponse(status, {}, body))
        return responses


def contact(n: int, **fields: Any) -> SinkRecord:
    return SinkRecord("contacts", str(uuid.UUID(int=n)), fields=fields or {"firstname": f"n{n}"})


def urls(batch: Sequence[BatchRequest | ChangeSet]) -> list[str]:
    return [r.url for r in batch if isinstance(r, BatchRequest)]


async def test_a_rejected_record_fails_alone_and_every_record_gets_an_outcome() -> None:
    def answer(r: BatchRequest) -> tuple[int, str]:
        body = r.body or {}
        return (
            error(400, "firstname too long") if len(body.get("firstname", "")) > 50 else (204, "")
        )

    sink = DynamicsSink(ScriptedDynamics(answer))
    records = [contact(1), contact(2, firstname="x" * 51), contact(3)]
    outcomes = await sink.write_batch(records)
    await sink.aclose()

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], RecordRejected) and "firstname too long" in outcomes[1].reason
    assert isinstance(sink, BatchingSink)


async def test_records_with_the_same_key_go_in_successive_batches_in_order() -> None:
    client = ScriptedDynamics(ok)
    sink = DynamicsSink(client)
    records = [
        contact(1, firstname="a"),
        contact(2),
        contact(1, firstname="b"),
        contact(1, firstname="c"),
    ]

    assert await sink.write_batch(records) == [None] * 4
    firsts = [
        [r.body for r in b if isinstance(r, BatchRequest) and r.url.endswith("1)")]
        for b in client.batches
    ]
    assert firsts == [[{"firstname": "a"}], [{"firstname": "b"}], [{"firstname": "c"}]]
    await sink.aclose()


async def test_a_key_that_failed_retryably_holds_back_its_later_records() -> None:
    def answer(r: BatchRequest) -> tuple[int, str]:
        return error(503) if r.url.endswith("1)") else (204, "")

    sink = DynamicsSink(ScriptedDynamics(answer))
    outcomes = await sink.write_batch(
        [contact(1, firstname="a"), contact(2), contact(1, firstname="b")]
    )
    await sink.aclose()

    assert isinstance(outcomes[0], Retryable)
    assert outcomes[1] is None
    assert isinstance(outcomes[2], Retryable) and "not attempted" in outcomes[2].reason


async def test_throttled_parts_are_sent_again_within_the_policy() -> None:
    seen: dict[str, int] = {}

    def answer(r: BatchRequest) -> tuple[int, str]:
        seen[r.url] = seen.get(r.url, 0) + 1
        return error(429) if r.url.endswith("2)") and seen[r.url] < 3 else (204, "")

    client = ScriptedDynamics(answer)
    sink = DynamicsSink(client)
    outcomes = await sink.write_batch([contact(1), contact(2)])
    await sink.aclose()

    assert outcomes == [None, None]
    assert [len(b) for b in client.batches] == [2, 1, 1]  # only the throttled part went again


async def test_create_only_and_delete_outcomes_are_idempotent() -> None:
    def answer(r: BatchRequest) -> tuple[int, str]:
        if r.method == "DELETE":
            return error(404, "contact With Id = x Does Not Exist")
        return error(412, "exists") if r.headers.get("If-None-Match") == "*" else (204, "")

    sink = DynamicsSink(ScriptedDynamics(answer))
    records = [
        SinkRecord(
            "crmsync_emailsends",
            "ev-1",
            fields={"subject": "s"},
            mode="create",
            key_field="crmsync_eventid",
        ),
        SinkRecord("contacts", str(uuid.UUID(int=5)), op="delete"),
    ]
    assert await sink.write_batch(records) == [None, None]
    await sink.aclose()


async def test_atomic_batches_drop_the_rejected_record_and_write_the_rest() -> None:
    def answer(r: BatchRequest) -> tuple[int, str]:
        return (
            error(400, "bad email") if (r.body or {}).get("emailaddress1") == "bad" else (204, "")
        )

    client = ScriptedDynamics(answer)
    sink = DynamicsSink(client, atomic=True)
    outcomes = await sink.write_batch([contact(1), contact(2, emailaddress1="bad"), contact(3)])
    await sink.aclose()

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], RecordRejected)
    assert all(isinstance(item, ChangeSet) for batch in client.batches for item in batch)
    assert [len(b[0].requests) for b in client.batches if isinstance(b[0], ChangeSet)] == [3, 2]


async def test_a_malformed_key_is_rejected_without_a_request() -> None:
    client = ScriptedDynamics(ok)
    sink = DynamicsSink(client)
    outcomes = await sink.write_batch([SinkRecord("contacts", "nope"), contact(1)])
    await sink.aclose()

    assert isinstance(outcomes[0], RecordRejected) and outcomes[1] is None
    assert len(client.batches) == 1 and len(client.batches[0]) == 1


async def test_a_fatal_batch_answer_is_every_records_outcome() -> None:
    class Forbidden(ScriptedDynamics):
        async def batch(
            self, items: Sequence[BatchRequest | ChangeSet], **_: Any
        ) -> list[BatchResponse]:
            raise Fatal("HTTP 403")

    sink = DynamicsSink(Forbidden(ok))
    outcomes = await sink.write_batch([contact(1), contact(2), contact(1)])
    await sink.aclose()

    assert [type(o) for o in outcomes] == [Fatal, Fatal, Retryable]


def missing(entity: str = "contact") -> tuple[int, str]:
    body = {"error": {"code": "0x80040217", "message": f"{entity} With Id = x Does Not Exist"}}
    return 404, json.dumps(body)


async def test_create_fields_go_only_into_a_create_then_the_rest_updates_in_order() -> None:
    existing = {str(uuid.UUID(int=1))}

    def answer(r: BatchRequest) -> tuple[int, str]:
        if r.headers.get("If-None-Match") == "*":
            if any(key in r.url for key in existing):
                return error(412, "exists")
        return 204, ""

    client = ScriptedDynamics(answer)
    sink = DynamicsSink(client)
    records = [
        SinkRecord("contacts", str(uuid.UUID(int=1)), fields={"a": 1}, create_fields={"c": 1}),
        SinkRecord("contacts", str(uuid.UUID(int=2)), fields={"a": 2}, create_fields={"c": 2}),
        SinkRecord("contacts", str(uuid.UUID(int=1)), fields={"a": 3}),
    ]
    outcomes = await sink.write_batch(records)
    await sink.aclose()

    assert outcomes == [None, None, None]
    sent = [
        (r.url[-2], r.headers.get("If-None-Match"), r.body)
        for batch in client.batches
        for r in batch
        if isinstance(r, BatchRequest)
    ]
    assert sent == [
        ("1", "*", {"a": 1, "c": 1}),  # create-only: the record exists (412)
        ("2", "*", {"a": 2, "c": 2}),  # created: done in one request
        ("1", None, {"a": 1}),  # so its fields are updated, create_fields left alone
        ("1", None, {"a": 3}),  # and only then the next record of that key
    ]


async def test_a_bind_to_a_missing_contact_or_an_update_of_a_missing_record_is_parent_missing() -> (
    None
):
    def answer(r: BatchRequest) -> tuple[int, str]:
        if "regardingobjectid_contact_crmsync_emailopen@odata.bind" in (r.body or {}):
            return missing()
        if r.headers.get("If-Match") == "*":
            return missing()
        return 204, ""

    client = ScriptedDynamics(answer)
    sink = DynamicsSink(client)
    contact_id = str(uuid.UUID(int=9))
    records = [
        SinkRecord(
            "crmsync_emailopens",
            "ev-1",
            fields={
                "regardingobjectid_contact_crmsync_emailopen@odata.bind": f"/contacts({contact_id})"
            },
            key_field="crmsync_eventid",
        ),
        SinkRecord("contacts", contact_id, fields={"donotbulkemail": True}, mode="update"),
        SinkRecord("contacts", contact_id, fields={"firstname": "x"}),
    ]
    outcomes = await sink.write_batch(records)
    await sink.aclose()

    assert isinstance(outcomes[0], ParentMissing)
    assert f"/contacts({contact_id})" in outcomes[0].reason
    assert isinstance(outcomes[1], ParentMissing) and "does not exist" in outcomes[1].reason
    assert isinstance(outcomes[2], Retryable) and "not attempted" in outcomes[2].reason
    assert len(client.batches) == 1  # parked by the runtime, not retried by the sink


class FakeCampaign:
    """Records the order and overlap of writes; fails the keys it is told to."""

    def __init__(self, fail: Mapping[str, SinkError] | None = None) -> None:
        self.fail = dict(fail or {})
        self.log: list[tuple[str, str]] = []
        self.running = self.peak = 0

    async def upsert(
        self,
        resource: str,
        value: str,
        fields: Mapping[str, Any],
        *,
        key_field: str | None = None,
        create_fields: Mapping[str, Any] | None = None,
        mode: str = "upsert",
    ) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        self.log.append((value, str(fields.get("v"))))
        if value in self.fail:
            raise self.fail[value]
        return "PKey"

    async def delete(self, resource: str, value: str, *, key_field: str | None = None) -> None:
        self.log.append((value, "deleted"))

    async def expect(self, resource: str, values: Any, *, key_field: str | None = None) -> None:
        return None  # no PKey cache to warm

    async def aclose(self) -> None:
        return None


def profile(key: str, v: int | str, op: str = "upsert") -> SinkRecord:
    return SinkRecord("profileAndServicesExt/profile", key, op=op, fields={"v": v})  # type: ignore[arg-type]


async def test_campaign_writes_keys_concurrently_but_each_key_in_order() -> None:
    fake = FakeCampaign()
    sink = CampaignSink(fake)  # type: ignore[arg-type]
    records = [
        profile("a", 1),
        profile("b", 1),
        profile("a", 2),
        profile("c", 1),
        profile("a", 3, "delete"),
    ]

    assert await sink.write_batch(records) == [None] * 5
    assert [v for k, v in fake.log if k == "a"] == ["1", "2", "deleted"]
    assert fake.peak >= 3


async def test_campaign_failures_are_per_record_and_block_only_their_key() -> None:
    fake = FakeCampaign({"a": Retryable("429", retry_after=2), "b": RecordRejected("invalid")})
    sink = CampaignSink(fake)  # type: ignore[arg-type]
    records = [profile("a", 1), profile("a", 2), profile("b", 1), profile("b", 2), profile("c", 1)]
    outcomes = await sink.write_batch(records)

    assert isinstance(outcomes[0], Retryable)
    assert isinstance(outcomes[1], Retryable) and "not attempted" in outcomes[1].reason
    assert isinstance(outcomes[2], RecordRejected) and isinstance(outcomes[3], RecordRejected)
    assert outcomes[4] is None
    assert retry_after(outcomes) == 2
    assert ("a", "2") not in fake.log


async def test_an_unexpected_error_becomes_fatal_not_a_lost_record() -> None:
    fake = FakeCampaign({"a": KeyError("PKey")})  # type: ignore[dict-item]
    outcomes = await CampaignSink(fake).write_batch([profile("a", 1)])  # type: ignore[arg-type]
    assert isinstance(outcomes[0], Fatal) and "KeyError" in outcomes[0].reason


async def test_the_discarding_sink_writes_nothing_and_reports_success() -> None:
    sink = DiscardingSink()
    assert await sink.write_batch([profile("a", 1)] * 3) == [None] * 3
    assert isinstance(sink, BatchingSink)
