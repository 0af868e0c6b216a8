"""How each target's answers are classified: written, rejected record, retry later, or fatal."""

from __future__ import annotations

import json
import uuid

import pytest

from crmsync.targets import campaign, dynamics
from crmsync.targets.errors import Fatal, NotFound, RecordRejected, Retryable
from crmsync.targets.settings import CampaignTarget, DynamicsTarget


def odata_error(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


MISSING_SET = odata_error("0x8006088a", "Resource not found for the segment 'nopes'.")
NO_RESOURCE = odata_error("", "No HTTP resource was found that matches the request URI 'x'.")
MISSING_ROW = odata_error("0x80040217", "contact With Id = 1 Does Not Exist")


@pytest.mark.parametrize(
    ("status", "body", "operation", "mode", "expected"),
    [
        (204, "", "write", "upsert", None),
        (200, "{}", "read", "upsert", None),
        (
            400,
            odata_error("0x80048d19", "firstname is too long"),
            "write",
            "upsert",
            RecordRejected,
        ),
        (413, "", "write", "upsert", RecordRejected),
        (409, "", "write", "upsert", RecordRejected),
        (412, "", "write", "create", None),  # create-only met an existing record: already done
        (412, "", "write", "upsert", RecordRejected),
        (404, MISSING_ROW, "delete", "upsert", None),  # already gone
        (404, MISSING_ROW, "write", "update", RecordRejected),
        (404, MISSING_SET, "write", "upsert", Fatal),
        (404, MISSING_SET, "delete", "upsert", Fatal),
        (404, NO_RESOURCE, "write", "upsert", Fatal),
        (401, "", "write", "upsert", Fatal),
        (403, odata_error("0x80040220", "no privilege"), "write", "upsert", Fatal),
        (408, "", "write", "upsert", Retryable),
        (
            429,
            odata_error("0x80072322", "Number of requests exceeded"),
            "write",
            "upsert",
            Retryable,
        ),
        (500, odata_error("0x80040216", "SQL timeout"), "write", "upsert", Retryable),
        (502, "", "write", "upsert", Retryable),
        (503, "<html>down</html>", "write", "upsert", Retryable),
        (504, "", "write", "upsert", Retryable),
        (424, "", "write", "upsert", Retryable),  # not executed: its change set failed
        (501, "", "write", "upsert", Fatal),
    ],
)
def test_dynamics_classification(
    status: int, body: str, operation: str, mode: str, expected: type | None
) -> None:
    outcome = dynamics.classify(status, body, {}, operation=operation, mode=mode)  # type: ignore[arg-type]
    assert (None if outcome is None else type(outcome)) is expected


def test_dynamics_rejection_carries_the_server_message_and_retry_after_is_read() -> None:
    rejected = dynamics.classify(400, odata_error("0x80048d19", "firstname is too long"), {})
    throttled = dynamics.classify(429, "", {"retry-after": "7"})

    assert isinstance(rejected, RecordRejected) and "firstname is too long" in rejected.reason
    assert isinstance(throttled, Retryable) and throttled.retry_after == 7.0


GATEWAY_401 = json.dumps({"error_code": "401013", "message": "Oauth token is not valid"})


@pytest.mark.parametrize(
    ("status", "body", "place", "delete", "expected"),
    [
        (200, "{}", "record", False, None),
        (201, "{}", "resource", False, None),
        (
            500,
            json.dumps({"code": 500, "message": "RST-360011 Property 'foo' is not valid"}),
            "resource",
            False,
            RecordRejected,
        ),
        (
            500,
            json.dumps({"message": "The property 'created' is read-only"}),
            "record",
            False,
            RecordRejected,
        ),
        (
            500,
            json.dumps({"message": "Value 'x' is invalid for field 'blackList'"}),
            "record",
            False,
            RecordRejected,
        ),
        (
            500,
            json.dumps(
                {"message": "RST-360011 An error has occurred - please contact your administrator."}
            ),
            "record",
            False,
            campaign.ServerFault,  # the generic answer to an unexpected failure: a few more tries
        ),
        (500, "Internal Server Error", "record", False, campaign.ServerFault),
        (
            500,
            json.dumps({"code": 500, "message": "PGS-220000 ERROR: duplicate key value"}),
            "resource",
            False,
            campaign.DuplicateKey,
        ),
        (
            500,
            json.dumps({"code": 500, "message": "Oops. Something went wrong. Check your URI."}),
            "resource",
            False,
            Fatal,
        ),
        (
            502,
            json.dumps({"message": "Oops. Something went wrong. Check your URI"}),
            "resource",
            False,
            Fatal,
        ),
        (502, "", "record", False, Retryable),
        (503, "", "resource", False, Retryable),
        (429, "", "resource", False, Retryable),
        (401, GATEWAY_401, "resource", False, Fatal),
        (403, "", "resource", False, Fatal),
        (404, "", "resource", False, NotFound),  # the resource itself is missing (a Fatal)
        (404, "", "record", True, None),  # the record is already gone
        (404, "", "record", False, RecordRejected),
        (400, json.dumps({"message": "bad"}), "resource", False, RecordRejected),
    ],
)
def test_campaign_classification(
    status: int, body: str, place: str, delete: bool, expected: type | None
) -> None:
    outcome = campaign.classify(status, body, {}, place=place, delete=delete)  # type: ignore[arg-type]
    assert (None if outcome is None else type(outcome)) is expected


@pytest.mark.parametrize(
    ("key", "segment"),
    [
        ("6F9619FF-8B86-D011-B42D-00C04FC964FF", "(6f9619ff-8b86-d011-b42d-00c04fc964ff)"),
        (uuid.UUID(int=1), "(00000000-0000-0000-0000-000000000001)"),
        ({"crmsync_eventid": "ev-1"}, "(crmsync_eventid='ev-1')"),
        ({"new_ordernumber": "A1", "new_product": "P"}, "(new_ordernumber='A1',new_product='P')"),
        ({"name": "O'Brien"}, "(name='O''Brien')"),
        ({"name": "a/b?c#d e%"}, "(name='a%2Fb%3Fc%23d%20e%25')"),
        ({"n": 42, "b": True}, "(n=42,b=true)"),
    ],
)
def test_dynamics_key_segments_quote_and_escape(key: dynamics.Key, segment: str) -> None:
    assert dynamics.key_segment(key) == segment


def test_a_primary_key_that_is_not_a_guid_is_a_rejected_record() -> None:
    with pytest.raises(RecordRejected):
        dynamics.key_segment("not-a-guid")


def test_dynamics_authority_and_scope_defaults() -> None:
    real = DynamicsTarget(url="https://contoso.crm.dynamics.com", tenant="t1")
    local = DynamicsTarget(url="http://127.0.0.1:8081/", tenant="local")
    custom = DynamicsTarget(url="http://127.0.0.1:8081", authority="https://login.example/t/")

    assert dynamics.default_authority(real) == "https://login.microsoftonline.com/t1"
    assert dynamics.default_authority(local) == "http://127.0.0.1:8081/local"
    assert dynamics.default_authority(custom) == "https://login.example/t"


def test_campaign_ims_defaults() -> None:
    assert campaign.default_ims_url(CampaignTarget(url="https://mc.adobe.io")) == (
        "https://ims-na1.adobelogin.com"
    )
    assert campaign.default_ims_url(CampaignTarget(url="http://127.0.0.1:8082")) == (
        "http://127.0.0.1:8082"
    )
    assert (
        campaign.default_ims_url(
            CampaignTarget(url="https://mc.adobe.io", ims_url="https://ims-na2.adobelogin.com/")
        )
        == "https://ims-na2.adobelogin.com"
    )


def test_campaign_lookups_default_to_the_by_field_convention() -> None:
    profile = campaign.DEFAULT_LOOKUPS["profileAndServices/profile"]
    custom = campaign.Lookup("purchaseId")

    assert (
        profile.path("profileAndServices/profile") == "profileAndServicesExt/profile/byExternalId"
    )
    assert profile.query_parameter == "externalId_parameter"
    assert custom.path("customResources/cusPurchase") == "customResources/cusPurchase/byPurchaseId"
    assert custom.query_parameter == "purchaseId_parameter"
