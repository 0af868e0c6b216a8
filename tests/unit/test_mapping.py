"""Mapping rules: what a Dynamics change or a Campaign email event writes into the other system."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from crmsync.streams.catalog import parse_config
from crmsync.streams.config import (
    CampaignToD365Config,
    D365ToCampaignConfig,
)
from crmsync.streams.mapping import (
    MappingError,
    Write,
    contact_writes,
    email_event_writes,
    entity_writes,
    writes_for,
)
from crmsync.streams.sinks.base import ProfileLink
from crmsync.targets.errors import Fatal, RecordRejected

CONTACT = str(uuid.UUID(int=7))
PROFILE = "profileAndServicesExt/profile"


def change(
    op: str = "u",
    after: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
    key: str = CONTACT,
    entity: str = "contact",
) -> dict[str, Any]:
    return {
        "op": op,
        "entity": entity,
        "key": key,
        "before": before,
        "after": None if op == "d" else (after or {}),
        "source": {"system": "d365", "ts_ms": 1_000, "user": None, "txid": None},
        "ts_ms": 1_001,
    }


def d2c(**data: Any) -> D365ToCampaignConfig:
    config = parse_config("d365-to-campaign", data)
    assert isinstance(config, D365ToCampaignConfig)
    return config


def only(writes: list[Write]) -> Write:
    assert len(writes) == 1, writes
    return writes[0]


def test_a_contact_change_upserts_its_profile_by_external_id_with_mapped_fields() -> None:
    after = {
        "contactid": CONTACT,
        "firstname": "Ada",
        "lastname": "Lovelace",
        "emailaddress1": "ada@example.org",
        "jobtitle": "Countess",  # not mapped
    }
    write = only(contact_writes(change("c", after), d2c()))

    assert write.system == "campaign"
    record = write.record
    assert (record.target, record.key, record.op, record.key_field) == (
        PROFILE,
        CONTACT,
        "upsert",
        "externalId",
    )
    assert dict(record.fields) == {
        "firstName": "Ada",
        "lastName": "Lovelace",
        "email": "ada@example.org",
    }


def test_a_partial_update_writes_only_the_fields_it_carries_and_nulls_clear() -> None:
    write = only(contact_writes(change("u", {"lastname": "King", "firstname": None}), d2c()))
    assert dict(write.record.fields) == {"lastName": "King", "firstName": None}
    assert contact_writes(change("u", {"jobtitle": "x"}), d2c()) == []


def test_apply_updates_false_fields_are_written_only_on_create() -> None:
    config = d2c(
        mappings=[
            {"source": "firstname", "target": "firstName"},
            {"source": "emailaddress1", "target": "email", "apply_updates": False},
        ]
    )
    record = only(contact_writes(change("u", {"firstname": "A", "emailaddress1": "a@x"}), config))
    assert dict(record.record.fields) == {"firstName": "A"}
    assert dict(record.record.create_fields) == {"email": "a@x"}


def test_replacements_picklists_defaults_and_lengths() -> None:
    config = d2c(
        mappings=[
            {"source": "gendercode", "target": "gender", "picklist": {"1": "male", "2": "female"}},
            {
                "source": "preferredcontactmethodcode",
                "target": "channel",
                "picklist": {"1": "Any", "2": "Email"},
                "default": "Unknown",
            },
            {"source": "donotemail", "target": "emailOk", "replacements": {"true": False}},
            {"source": "firstname", "target": "firstName", "max_length": 3, "default": "?"},
            {"source": "address1_country", "target": "country", "replacements": {"UK": "GB"}},
        ]
    )
    after = {
        "gendercode": 2,
        "preferredcontactmethodcode": 9,
        "donotemail": True,
        "firstname": "Augusta",
        "address1_country": "UK",
    }
    fields = only(contact_writes(change("u", after), config)).record.fields
    assert dict(fields) == {
        "gender": "female",
        "channel": "Unknown",
        "emailOk": False,
        "firstName": "Aug",
        "country": "GB",
    }
    fields = only(
        contact_writes(change("u", {"firstname": None, "gendercode": 1.0}), config)
    ).record.fields
    assert dict(fields) == {"firstName": "?", "gender": "male"}

    with pytest.raises(MappingError, match=r"gendercode.*option-set value 3") as caught:
        contact_writes(change("u", {"gendercode": 3}), config)
    assert isinstance(caught.value, RecordRejected)


FILTER_CASES = [
    ({"field": "statecode", "op": "eq", "value": 0}, {"statecode": 0}, True),
    ({"field": "statecode", "op": "eq", "value": 0}, {"statecode": 1}, False),
    ({"field": "statecode", "op": "eq", "value": "0"}, {"statecode": 0}, True),
    ({"field": "statecode", "op": "ne", "value": 1}, {}, True),
    ({"field": "statecode", "op": "ne", "value": 1}, {"statecode": 1}, False),
    ({"field": "country", "op": "in", "value": ["FR", "DE"]}, {"country": "DE"}, True),
    ({"field": "country", "op": "in", "value": ["FR", "DE"]}, {"country": "UK"}, False),
    ({"field": "emailaddress1", "op": "exists"}, {"emailaddress1": "a@b"}, True),
    ({"field": "emailaddress1", "op": "exists"}, {"emailaddress1": None}, False),
    ({"field": "emailaddress1", "op": "exists", "value": False}, {}, True),
    ({"field": "emailaddress1", "op": "prefix", "value": "vip."}, {"emailaddress1": "vip.a"}, True),
    ({"field": "emailaddress1", "op": "prefix", "value": "vip."}, {"emailaddress1": "a"}, False),
    ({"field": "n", "op": "prefix", "value": "1"}, {"n": 12}, False),
]


@pytest.mark.parametrize(("condition", "record", "synced"), FILTER_CASES)
def test_filter_operators(condition: dict[str, Any], record: dict[str, Any], synced: bool) -> None:
    config = d2c(filters={"all": [condition]})
    writes = contact_writes(change("u", {"firstname": "A", **record}), config)
    assert bool(writes) is synced


def test_and_or_nesting_uses_before_for_fields_the_update_does_not_carry() -> None:
    # Active contacts that are either in France, or VIPs with an email address.
    config = d2c(
        filters={
            "all": [
                {"field": "statecode", "op": "eq", "value": 0},
                {
                    "any": [
                        {"field": "address1_country", "op": "eq", "value": "FR"},
                        {
                            "all": [
                                {"field": "jobtitle", "op": "prefix", "value": "VIP"},
                                {"field": "emailaddress1", "op": "exists"},
                            ]
                        },
                    ]
                },
            ]
        }
    )

    def synced(after: dict[str, Any], before: dict[str, Any] | None = None) -> bool:
        return bool(contact_writes(change("u", {"firstname": "A", **after}, before), config))

    assert synced({"statecode": 0, "address1_country": "FR"})
    assert not synced({"statecode": 1, "address1_country": "FR"})
    assert synced({"statecode": 0, "jobtitle": "VIP buyer", "emailaddress1": "a@b"})
    assert not synced({"statecode": 0, "jobtitle": "VIP buyer"})
    assert not synced({"statecode": 0, "address1_country": "DE"})
    assert synced({}, before={"statecode": 0, "address1_country": "FR"})
    assert not synced({"statecode": 1}, before={"statecode": 0, "address1_country": "FR"})


def test_deletes_propagate_unless_disabled() -> None:
    write = only(contact_writes(change("d"), d2c()))
    assert (write.record.op, write.record.target, write.record.key) == ("delete", PROFILE, CONTACT)
    assert write.record.key_field == "externalId"
    assert contact_writes(change("d"), d2c(propagate_deletes=False)) == []


def test_a_contact_filtered_out_is_skipped_or_its_profile_deleted() -> None:
    filters = {"all": [{"field": "statecode", "op": "eq", "value": 0}]}
    inactive = change("u", {"statecode": 1, "firstname": "A"})

    assert contact_writes(inactive, d2c(filters=filters)) == []
    write = only(contact_writes(inactive, d2c(filters=filters, delete_when_filtered_out=True)))
    assert write.record.op == "delete" and write.record.key == CONTACT


PURCHASE = str(uuid.UUID(int=99))
PURCHASES = "d365.entity.new_purchase.changes"


def test_a_custom_entity_row_is_upserted_by_its_key_field_and_linked_to_its_profile() -> None:
    config = d2c()
    event = change(
        "c",
        {
            "new_purchaseid": PURCHASE,
            "new_product": "Analytical Engine",
            "new_amount": 12.5,
            "new_quantity": 2,
            "_new_contactid_value": CONTACT,
        },
        key=PURCHASE,
        entity="new_purchase",
    )
    write = only(writes_for(event, PURCHASES, config))

    assert write.system == "campaign"
    assert (write.record.target, write.record.key, write.record.key_field) == (
        "profileAndServicesExt/cusPurchase",
        PURCHASE,
        "purchaseId",
    )
    assert dict(write.record.fields) == {
        "product": "Analytical Engine",
        "amount": 12.5,
        "quantity": 2,
        "profile": ProfileLink(CONTACT),
    }
    unlinked = entity_writes(
        change("u", {"_new_contactid_value": None}, key=PURCHASE),
        config.custom_entities[0],
        config,
    )
    assert dict(only(unlinked).record.fields) == {"profile": None}
    deleted = only(writes_for(change("d", key=PURCHASE), PURCHASES, config))
    assert (deleted.record.op, deleted.record.key_field) == ("delete", "purchaseId")


def test_custom_entity_filters_and_delete_settings_are_its_own() -> None:
    config = d2c(
        custom_entities=[
            {
                "logical_name": "new_purchase",
                "resource": "cusPurchase",
                "key_field": "purchaseId",
                "mappings": [{"source": "new_product", "target": "product"}],
                "filters": {"all": [{"field": "new_amount", "op": "ne", "value": 0}]},
                "propagate_deletes": False,
            }
        ]
    )
    free = change("u", {"new_product": "x", "new_amount": 0}, key=PURCHASE)
    assert writes_for(free, PURCHASES, config) == []
    assert writes_for(change("d", key=PURCHASE), PURCHASES, config) == []
    assert "link" not in dict(
        only(
            writes_for(change("u", {"new_product": "x"}, key=PURCHASE), PURCHASES, config)
        ).record.fields
    )


def test_writes_for_dispatches_by_topic_and_an_unknown_topic_is_fatal() -> None:
    config = d2c()
    contact = only(writes_for(change("u", {"firstname": "A"}), "d365.contact.changes", config))
    assert contact.record.target == PROFILE
    with pytest.raises(Fatal, match="no mapping for topic"):
        writes_for(change("u", {"firstname": "A"}), "d365.entity.other.changes", config)
    with pytest.raises(MappingError, match="no after"):
        writes_for({**change("u"), "after": None}, "d365.contact.changes", config)


def email_event(kind: str = "open", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"evt-{kind}-1",
        "type": kind,
        "ts_ms": 1_714_564_800_250,  # 2024-05-01T12:00:00.250Z
        "contact_id": CONTACT,
        "email": "ada@example.org",
        "campaign_id": "CMP42",
        "campaign_name": "Spring",
        "delivery_id": "DLV7",
        "delivery_name": "Spring, wave 1",
        "mirror_page_url": "https://m.example.org/7",
        "url": None,
        "bounce_type": None,
        "bounce_reason": None,
    }
    return {**event, **overrides}


def c2d(**data: Any) -> CampaignToD365Config:
    config = parse_config("campaign-to-d365", data)
    assert isinstance(config, CampaignToD365Config)
    return config


def test_an_email_event_becomes_an_activity_upserted_by_event_id_and_linked() -> None:
    write = only(email_event_writes(email_event("open"), c2d()))

    assert write.system == "d365"
    record = write.record
    assert (record.target, record.key, record.key_field, record.op) == (
        "crmsync_emailopens",
        "evt-open-1",
        "crmsync_eventid",
        "upsert",
    )
    assert dict(record.fields) == {
        "subject": "CMP42 / DLV7",
        "crmsync_campaignname": "Spring",
        "crmsync_deliveryname": "Spring, wave 1",
        "crmsync_eventtime": "2024-05-01T12:00:00.250Z",
        "crmsync_mirrorpageurl": "https://m.example.org/7",
        "regardingobjectid_contact_crmsync_emailopen@odata.bind": f"/contacts({CONTACT})",
    }


def test_clicks_carry_the_url_and_bounces_their_type_and_reason() -> None:
    click = only(email_event_writes(email_event("click", url="https://x.org/a"), c2d())).record
    bounce = only(
        email_event_writes(
            email_event("bounce", bounce_type="hard", bounce_reason="no such user"), c2d()
        )
    ).record

    assert (
        click.target == "crmsync_emailclicks" and click.fields["crmsync_url"] == "https://x.org/a"
    )
    assert bounce.target == "crmsync_emailbounces"
    assert (bounce.fields["crmsync_bouncetype"], bounce.fields["crmsync_bouncereason"]) == (
        "hard",
        "no such user",
    )
    assert "crmsync_url" not in bounce.fields


def test_disabled_event_types_write_nothing_and_entity_sets_are_configurable() -> None:
    config = c2d(events={"open": {"enabled": False}, "send": {"entity_set": "new_sends"}})
    assert email_event_writes(email_event("open"), config) == []
    assert only(email_event_writes(email_event("send"), config)).record.target == "new_sends"
    assert only(email_event_writes(email_event("click"), config)).record.target == (
        "crmsync_emailclicks"
    )


def test_subject_template_and_missing_values() -> None:
    config = c2d(subject_template="{campaign_name}: {type} ({delivery_id})")
    record = only(
        email_event_writes(email_event("send", delivery_id=None, mirror_page_url=None), config)
    ).record
    assert record.fields["subject"] == "Spring: send ()"
    assert "crmsync_mirrorpageurl" not in record.fields
    long = only(email_event_writes(email_event("send", campaign_name="x" * 500), config))
    assert len(long.record.fields["subject"]) == 400


@pytest.mark.parametrize("bad", ["42", "", "not-a-guid-at-all", CONTACT + "0"])
def test_a_contact_id_that_is_not_a_guid_is_a_mapping_error(bad: str) -> None:
    with pytest.raises(MappingError, match="not a GUID"):
        email_event_writes(email_event("open", contact_id=bad), c2d())
