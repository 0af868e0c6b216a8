"""OData v4 `$batch` bodies: requests and change sets as multipart/mixed, and their answers."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CRLF = "\r\n"


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One request inside a `$batch`.

    ``url`` is what goes on the request line: an absolute path such as
    ``/api/data/v9.2/contacts(…)`` (what the Dataverse docs use). ``content_id`` identifies the
    request in the response; the encoder numbers requests without one.
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] | None = None
    content_id: str | None = None


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Requests that succeed or fail together (the server rolls back the whole set on a failure)."""

    requests: Sequence[BatchRequest]


@dataclass(frozen=True, slots=True)
class BatchResponse:
    """The answer to one request of a `$batch` (``content_id`` when the server echoed one)."""

    status: int
    headers: Mapping[str, str]
    body: str
    content_id: str | None = None

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None


def count_requests(items: Sequence[BatchRequest | ChangeSet]) -> int:
    """How many requests count against the 1,000-per-batch limit (each change-set member counts)."""
    return sum(len(i.requests) if isinstance(i, ChangeSet) else 1 for i in items)


def _encode_request(request: BatchRequest, content_id: str) -> str:
    lines = [
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        f"Content-ID: {content_id}",
        "",
        f"{request.method} {request.url} HTTP/1.1",
    ]
    headers = dict(request.headers)
    payload = ""
    if request.body is not None:
        headers.setdefault("Content-Type", "application/json; type=entry")
        payload = json.dumps(request.body, separators=(",", ":"), ensure_ascii=False)
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["", payload]
    return CRLF.join(lines)


def encode_batch(
    items: Sequence[BatchRequest | ChangeSet], boundary: str | None = None
) -> tuple[str, bytes]:
    """The Content-Type header (with its boundary) and the body of a `$batch` request.

    Requests get Content-IDs "1", "2", … in order unless they carry their own; Content-IDs are
    unique across the whole batch, so answers can be matched back even inside change sets.
    """
    boundary = boundary or f"batch_{uuid.uuid4()}"
    parts: list[str] = []
    number = 0

    def next_id(request: BatchRequest) -> str:
        nonlocal number
        number += 1
        return request.content_id or str(number)

    for item in items:
        if isinstance(item, ChangeSet):
            cs_boundary = f"changeset_{uuid.uuid4()}"
            inner = [
                f"--{cs_boundary}{CRLF}{_encode_request(r, next_id(r))}" for r in item.requests
            ]
            parts.append(
                f"Content-Type: multipart/mixed; boundary={cs_boundary}{CRLF}{CRLF}"
                + CRLF.join(inner)
                + f"{CRLF}--{cs_boundary}--"
            )
        else:
            parts.append(_encode_request(item, next_id(item)))
    body = "".join(f"--{boundary}{CRLF}{part}{CRLF}" for part in parts) + f"--{boundary}--{CRLF}"
    return f"multipart/mixed; boundary={boundary}", body.encode("utf-8")


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_STATUS_LINE = re.compile(r"^HTTP/\d(?:\.\d)?\s+(\d{3})")


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type header."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise ValueError(f"no boundary in Content-Type {content_type!r}")
    return match.group(1).strip()


def _split_head(text: str) -> tuple[dict[str, str], str]:
    """Headers (case-insensitive keys, lower-cased) and the rest, split at the first blank line."""
    text = text.lstrip("\r\n")
    match = re.search(r"\r?\n\r?\n", text)
    head, rest = (text[: match.start()], text[match.end() :]) if match else (text, "")
    headers: dict[str, str] = {}
    for line in re.split(r"\r?\n", head):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _split_parts(body: str, boundary: str) -> list[str]:
    """The parts between ``--boundary`` delimiters, up to the closing ``--boundary--``."""
    delimiter = re.compile(rf"(?:^|\r?\n)--{re.escape(boundary)}(--)?[ \t]*(?:\r?\n|$)")
    parts: list[str] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):  # the closing delimiter: the epilogue after it is ignored
            return parts
        start = match.end()
    if start is not None:
        parts.append(body[start:])  # a body cut short: keep what arrived, the caller counts
    return parts


def _parse_http_part(part: str) -> BatchResponse:
    mime_headers, rest = _split_head(part)
    rest = rest.lstrip("\r\n")
    status_line, _, rest = rest.partition("\n")
    match = _STATUS_LINE.match(status_line.strip())
    if not match:
        raise ValueError(f"not an HTTP response line: {status_line.strip()[:80]!r}")
    headers, body = _split_head("x: x\n" + rest)  # a dummy header so an empty head still splits
    headers.pop("x", None)
    return BatchResponse(
        status=int(match.group(1)),
        headers=headers,
        body=body.rstrip("\r\n"),
        content_id=mime_headers.get("content-id") or headers.get("content-id"),
    )


def decode_batch(content_type: str, body: bytes | str) -> list[BatchResponse]:
    """The responses of a `$batch` answer, flattened in order (change-set members in place)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    responses: list[BatchResponse] = []
    for part in _split_parts(text, boundary_of(content_type)):
        mime_headers, rest = _split_head(part)
        part_type = mime_headers.get("content-type", "")
        if part_type.lower().startswith("multipart/mixed"):
            responses += [
                _parse_http_part(inner) for inner in _split_parts(rest, boundary_of(part_type))
            ]
        else:
            responses.append(_parse_http_part(part))
    return responses
