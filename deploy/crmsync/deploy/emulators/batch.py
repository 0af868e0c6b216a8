"""OData $batch bodies: multipart/mixed requests with nested change sets, and their responses."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

MAX_REQUESTS = 1000


class BatchError(Exception):
    """A $batch body the service cannot read (400)."""


@dataclass
class BatchRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class ChangeSet:
    requests: list[BatchRequest] = field(default_factory=list)


BatchItem = BatchRequest | ChangeSet


@dataclass
class PartResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    content_id: str | None = None


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    kind, *params = value.split(";")
    found = {}
    for param in params:
        name, _, v = param.strip().partition("=")
        found[name.strip().lower()] = v.strip().strip('"')
    return kind.strip().lower(), found


def _boundary_of(content_type: str) -> str:
    kind, params = content_type_params(content_type)
    boundary = params.get("boundary", "")
    if kind != "multipart/mixed" or not boundary or len(boundary) > 70:
        raise BatchError("The batch request must have a multipart/mixed boundary.")
    return boundary


def _split(body: bytes, boundary: str) -> list[bytes]:
    """The parts between boundary delimiter lines; the closing delimiter must be there."""
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            return parts
        start = match.end()
    raise BatchError("The batch request body is truncated: no closing boundary.")


def _headers_and_content(part: bytes) -> tuple[dict[str, str], bytes]:
    match = re.search(rb"\r?\n\r?\n", part)
    if match is None:
        head, content = part, b""
    else:
        head, content = part[: match.start()], part[match.end() :]
    headers: dict[str, str] = {}
    for raw in re.split(rb"\r?\n", head):
        if not raw.strip():
            continue
        name, colon, value = raw.partition(b":")
        if not colon or not name.strip() or b" " in name.strip():
            raise BatchError("A header line in the batch request is malformed.")
        try:
            headers[name.strip().decode("ascii").lower()] = value.strip().decode("utf-8")
        except UnicodeDecodeError:
            raise BatchError("A header in the batch request is not valid text.") from None
    return headers, content


_REQUEST_LINE = re.compile(rb"^(GET|POST|PATCH|PUT|DELETE) (\S+) HTTP/1\.[01]\Z")


def _request(part: bytes) -> BatchRequest:
    mime, content = _headers_and_content(part)
    kind, _ = content_type_params(mime.get("content-type", ""))
    if kind != "application/http":
        raise BatchError("Each batch part must be application/http or a change set.")
    line_end = re.search(rb"\r?\n", content)
    line = content[: line_end.start()] if line_end else content
    match = _REQUEST_LINE.match(line.strip())
    if match is None:
        raise BatchError("A batch part does not start with a valid HTTP request line.")
    headers, body = _headers_and_content(content[line_end.end() :] if line_end else b"")
    content_id = mime.get("content-id") or headers.get("content-id")
    return BatchRequest(
        method=match.group(1).decode(),
        url=match.group(2).decode("utf-8", "replace"),
        headers=headers,
        body=body,
        content_id=content_id,
    )


def parse_batch(content_type: str, body: bytes) -> list[BatchItem]:
    items: list[BatchItem] = []
    count = 0
    for part in _split(body, _boundary_of(content_type)):
        mime, content = _headers_and_content(part)
        kind, _ = content_type_params(mime.get("content-type", ""))
        if kind == "multipart/mixed":
            changeset = ChangeSet()
            for inner in _split(content, _boundary_of(mime["content-type"])):
                request = _request(inner)
                if request.method == "GET":
                    raise BatchError("A change set cannot contain a GET request.")
                changeset.requests.append(request)
            if not changeset.requests:
                raise BatchError("A change set must contain at least one request.")
            items.append(changeset)
            count += len(changeset.requests)
        else:
            items.append(_request(part))
            count += 1
        if count > MAX_REQUESTS:
            raise BatchError(f"The number of requests in a batch exceeds {MAX_REQUESTS}.")
    if not items:
        raise BatchError("The batch request contains no parts.")
    return items


def count_requests(items: list[BatchItem]) -> int:
    return sum(len(i.requests) if isinstance(i, ChangeSet) else 1 for i in items)


def _http_part(response: PartResponse) -> bytes:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if response.content_id is not None:
        lines.append(f"Content-ID: {response.content_id}")
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    lines += ["", f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + response.body


def render_batch(results: list[PartResponse | list[PartResponse]]) -> tuple[str, bytes]:
    """The response body and its boundary; a list is a change set that succeeded."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    chunks: list[bytes] = []
    for result in results:
        chunks.append(f"--{boundary}\r\n".encode())
        if isinstance(result, list):
            inner = f"changesetresponse_{uuid.uuid4()}"
            chunks.append(f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode())
            for response in result:
                chunks.append(f"--{inner}\r\n".encode() + _http_part(response) + b"\r\n")
            chunks.append(f"--{inner}--\r\n".encode())
        else:
            chunks.append(_http_part(result) + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return boundary, b"".join(chunks)
