"""The HTTP API from the command line's side: `crmsync workflows ...` talks to a control plane."""

from __future__ import annotations

from typing import Any

import httpx


class Unreachable(RuntimeError):
    """No control plane answers at the URL."""


class Refused(RuntimeError):
    """The control plane answered with an error (4xx/5xx)."""

    def __init__(self, status: int, message: str, body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ControlClient:
    def __init__(self, base_url: str, token: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self.base_url = base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise Unreachable(f"no control plane at {self.base_url}: {error}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text.strip() or response.reason_phrase}
        if response.status_code >= 400:
            message = body.get("error", "") if isinstance(body, dict) else str(body)
            if isinstance(body, dict) and body.get("errors"):
                message += "".join(
                    f"\n  {'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}"
                    for e in body["errors"]
                )
            raise Refused(response.status_code, f"{response.status_code}: {message}", body)
        return body

    def workflows(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/workflows")["workflows"]
        return result

    def workflow(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/v1/workflows/{name}")
        return result

    def start(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/v1/workflows/{name}/start")
        return result

    def stop(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/v1/workflows/{name}/stop")
        return result

    def preview(self, name: str, config: dict[str, Any] | None, limit: int) -> dict[str, Any]:
        body: dict[str, Any] = {"limit": limit}
        if config is not None:
            body["config"] = config
        result: dict[str, Any] = self._call("POST", f"/api/v1/workflows/{name}/preview", json=body)
        return result

    def replay(self, name: str, from_: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/api/v1/workflows/{name}/replay", json={"from": from_}
        )
        return result

    def dead_letters(self, name: str, query: dict[str, str]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "GET", f"/api/v1/workflows/{name}/dead-letters", params=query
        )
        return result

    def redrive(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST", f"/api/v1/workflows/{name}/dead-letters/redrive", json=body
        )
        return result

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
