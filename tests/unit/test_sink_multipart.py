"""The `$batch` multipart codec: what goes on the wire and how answers are read back."""

from __future__ import annotations

import json

import pytest

from crmsync.targets._multipart import (
    BatchRequest,
    ChangeSet,
    boundary_of,
    count_requests,
    decode_batch,
    encode_batch,
)

# The shape of a Dataverse answer, as in the Web API docs: a change set, then a plain part.
DOCS_RESPONSE = (
    "--batchresponse_c1bd\r\n"
    "Content-Type: multipart/mixed; boundary=changesetresponse_ff83\r\n"
    "\r\n"
    "--changesetresponse_ff83\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 1\r\n"
    "\r\n"
    "HTTP/1.1 204 No Content\r\n"
    "OData-Version: 4.0\r\n"
    "OData-EntityId: https://org.crm.dynamics.com/api/data/v9.2/tasks(a59c24f3-fafc-e411-80dd-00155d2a68cb)\r\n"
    "\r\n"
    "\r\n"
    "--changesetresponse_ff83\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 2\r\n"
    "\r\n"
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: application/json; odata.metadata=minimal\r\n"
    "\r\n"
    '{"error":{"code":"0x80048d19","message":"too long"}}\r\n'
    "--changesetresponse_ff83--\r\n"
    "--batchresponse_c1bd\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "\r\n"
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: application/json; odata.metadata=minimal\r\n"
    "OData-Version: 4.0\r\n"
    "\r\n"
    '{\r\n  "value": [{"name": "a"}]\r\n}\r\n'
    "--batchresponse_c1bd--\r\n"
)


def test_decodes_the_documented_answer_change_set_members_in_place() -> None:
    answers = decode_batch("multipart/mixed; boundary=batchresponse_c1bd", DOCS_RESPONSE.encode())

    assert [a.status for a in answers] == [204, 400, 200]
    assert [a.content_id for a in answers] == ["1", "2", None]
    assert answers[0].headers["odata-entityid"].endswith("(a59c24f3-fafc-e411-80dd-00155d2a68cb)")
    assert answers[0].body == ""
    assert answers[1].json() == {"error": {"code": "0x80048d19", "message": "too long"}}
    assert answers[2].json() == {"value": [{"name": "a"}]}


def test_decodes_bare_lf_line_endings_and_ignores_preamble_and_epilogue() -> None:
    text = DOCS_RESPONSE.replace("\r\n", "\n")
    text = "a preamble\n" + text + "an epilogue\n"
    answers = decode_batch('multipart/mixed; boundary="batchresponse_c1bd"', text)
    assert [a.status for a in answers] == [204, 400, 200]


def test_encodes_requests_with_numbered_content_ids_and_json_bodies() -> None:
    content_type, body = encode_batch(
        [
            BatchRequest("PATCH", "/api/data/v9.2/contacts(1)", {"If-Match": "*"}, {"a": "é"}),
            BatchRequest("DELETE", "/api/data/v9.2/contacts(2)"),
        ],
        boundary="batch_x",
    )
    text = body.decode()

    assert content_type == "multipart/mixed; boundary=batch_x"
    assert text.startswith("--batch_x\r\n") and text.endswith("--batch_x--\r\n")
    first, second = text.split("--batch_x\r\n")[1:]
    assert "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n" in first
    assert "Content-ID: 1\r\n\r\nPATCH /api/data/v9.2/contacts(1) HTTP/1.1\r\n" in first
    assert "If-Match: *\r\n" in first
    assert 'Content-Type: application/json; type=entry\r\n\r\n{"a":"é"}' in first
    assert "Content-ID: 2\r\n\r\nDELETE /api/data/v9.2/contacts(2) HTTP/1.1\r\n" in second


def test_change_sets_nest_their_own_boundary_and_number_across_the_batch() -> None:
    items: list[BatchRequest | ChangeSet] = [
        BatchRequest("DELETE", "/x(1)"),
        ChangeSet(
            [BatchRequest("PATCH", "/x(2)", body={}), BatchRequest("PATCH", "/x(3)", body={})]
        ),
    ]
    content_type, body = encode_batch(items)
    text = body.decode()
    inner_type = next(line for line in text.splitlines() if "boundary=changeset_" in line)
    inner = boundary_of(inner_type)

    assert count_requests(items) == 3
    assert boundary_of(content_type).startswith("batch_")
    assert text.count(f"--{inner}\r\n") == 2 and f"--{inner}--" in text
    assert "Content-ID: 2\r\n\r\nPATCH /x(2)" in text and "Content-ID: 3\r\n\r\nPATCH /x(3)" in text


def test_an_encoded_batch_reads_back_through_the_decoder_shape() -> None:
    # The request and response grammars are the same multipart shape: decoding what we encode
    # (with request lines swapped for status lines) proves the framing and the boundaries.
    _, body = encode_batch(
        [BatchRequest("PATCH", "/x(1)", body={"k": "v\r\n--batch_y"}), BatchRequest("GET", "/y")],
        boundary="batch_y",
    )
    text = body.decode().replace("PATCH /x(1) HTTP/1.1", "HTTP/1.1 200 OK")
    text = text.replace("GET /y HTTP/1.1", "HTTP/1.1 204 No Content")
    answers = decode_batch("multipart/mixed; boundary=batch_y", text)

    assert [a.status for a in answers] == [200, 204]
    assert json.loads(answers[0].body) == {"k": "v\r\n--batch_y"}


def test_a_content_type_without_boundary_is_an_error() -> None:
    with pytest.raises(ValueError, match="boundary"):
        decode_batch("multipart/mixed", b"")
