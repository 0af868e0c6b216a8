"""$batch on the Dynamics emulator: atomic change sets, stop/continue on error, 400 on garbage."""

from __future__ import annotations

import json
import random
import re
import uuid
from typing import Any

import httpx


def _part(method: str, url: str, body: Any = None, content_id: str | None = None) -> str:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id:
        head += f"Content-ID: {content_id}\r\n"
    request = f"{method} {url} HTTP/1.1\r\n"
    if body is not None:
        request += "Content-Type: application/json\r\n\r\n" + json.dumps(body)
    else:
        request += "\r\n"
    return head + "\r\n" + request + "\r\n"


def _batch(items: list[str | list[str]]) -> tuple[str, bytes]:
    boundary = f"batch_{uuid.uuid4()}"
    chunks = []
    for item in items:
        if isinstance(item, list):
            inner = f"changeset_{uuid.uuid4()}"
            body = "".join(f"--{inner}\r\n{part}" for part in item) + f"--{inner}--\r\n"
            chunks.append(
                f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={inner}\r\n\r\n{body}"
            )
        else:
            chunks.append(f"--{boundary}\r\n{item}")
    return f"multipart/mixed; boundary={boundary}", (
        "".join(chunks) + f"--{boundary}--\r\n"
    ).encode()


def _statuses(response: httpx.Response) -> list[int]:
    return [int(s) for s in re.findall(rb"^HTTP/1\.1 (\d{3})", response.content, re.M)]


async def _post_batch(
    client: httpx.AsyncClient, items: list[str | list[str]], prefer: str | None = None
) -> httpx.Response:
    content_type, body = _batch(items)
    headers = {"Content-Type": content_type}
    if prefer:
        headers["Prefer"] = prefer
    return await client.post("$batch", content=body, headers=headers)


async def _count(client: httpx.AsyncClient, entity_set: str) -> int:
    return len((await client.get(entity_set)).json()["value"])


async def test_change_set_commits_together_and_references_content_ids(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    contact = {"firstname": "Batch", "lastname": "One"}
    event = {"subject": "open", "regardingobjectid_contact_crmsync_emailopen@odata.bind": "$1"}
    response = await _post_batch(
        emulated_dynamics,
        [
            [
                _part("POST", "contacts", contact, content_id="1"),
                _part("POST", "crmsync_emailopens", event, content_id="2"),
            ],
            _part("GET", "contacts?$select=firstname"),
        ],
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert _statuses(response) == [204, 204, 200]
    assert b"changesetresponse_" in response.content
    opens = (await emulated_dynamics.get("crmsync_emailopens")).json()["value"]
    assert opens[0]["_regardingobjectid_value"] is not None


async def test_failed_change_set_rolls_back_and_stops_the_batch(
    emulated_dynamics: httpx.AsyncClient,
) -> None:
    response = await _post_batch(
        emulated_dynamics,
        [
            [
                _part("POST", "contacts", {"firstname": "Rolled"}),
                _part("POST", "contacts", {"firstname": "x" * 80}),
            ],
            _part("POST", "contacts", {"firstname": "Never"}),
        ],
    )
    # Without continue-on-error a batch that stops answers an outer 400 (execute-batch docs).
    assert response.status_code == 400
    assert _statuses(response) == [400]
    assert await _count(emulated_dynamics, "contacts") == 0


async def test_continue_on_error_runs_every_request(emulated_dynamics: httpx.AsyncClient) -> None:
    parts: list[str | list[str]] = [
        _part("POST", "contacts", {"firstname": "A"}),
        _part("POST", "contacts", {"bogus": 1}),
        _part("PATCH", f"contacts({uuid.uuid4()})", {"firstname": "C"}),
        _part("DELETE", f"contacts({uuid.uuid4()})"),
    ]
    stopped = await _post_batch(emulated_dynamics, parts)
    assert _statuses(stopped) == [204, 400]
    continued = await _post_batch(emulated_dynamics, parts, prefer="odata.continue-on-error")
    assert _statuses(continued) == [204, 400, 204, 404]
    assert await _count(emulated_dynamics, "contacts") == 3


async def test_absolute_urls_and_limits(emulated_dynamics: httpx.AsyncClient) -> None:
    root = str(emulated_dynamics.base_url).rstrip("/")
    response = await _post_batch(emulated_dynamics, [_part("POST", f"{root}/contacts", {})])
    assert _statuses(response) == [204]
    too_many = await _post_batch(
        emulated_dynamics, [_part("DELETE", f"contacts({uuid.uuid4()})")] * 1001
    )
    assert too_many.status_code == 400
    get_in_change_set = await _post_batch(emulated_dynamics, [[_part("GET", "contacts")]])
    assert get_in_change_set.status_code == 400


async def test_thousand_writes_in_one_batch_are_fast(emulated_dynamics: httpx.AsyncClient) -> None:
    parts: list[str | list[str]] = [
        _part("PATCH", f"contacts({uuid.uuid4()})", {"firstname": f"F{i}", "lastname": "L"})
        for i in range(1000)
    ]
    response = await _post_batch(emulated_dynamics, parts)
    assert _statuses(response) == [204] * 1000
    assert response.elapsed.total_seconds() < 2.5


async def test_malformed_batches_are_400_never_500(emulated_dynamics: httpx.AsyncClient) -> None:
    rng = random.Random(7)
    content_type, good = _batch(
        [
            [_part("POST", "contacts", {"firstname": "Z"}, content_id="1")],
            _part("GET", "contacts?$filter=firstname eq 'Z'"),
        ]
    )
    samples: list[tuple[str, bytes]] = [
        ("multipart/mixed", good),
        ("application/json", good),
        (content_type, b""),
        (content_type, b"--nope--"),
    ]
    for _ in range(120):
        mutated = bytearray(good)
        choice = rng.random()
        if choice < 0.4:
            mutated = mutated[: rng.randrange(len(mutated))]
        elif choice < 0.8:
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        else:
            start = rng.randrange(len(mutated))
            mutated[start:start] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        samples.append((content_type, bytes(mutated)))
    for sample_type, body in samples:
        response = await emulated_dynamics.post(
            "$batch", content=body, headers={"Content-Type": sample_type}
        )
        assert response.status_code < 500, (response.status_code, body[:300])
        assert response.status_code in (200, 400), response.status_code
