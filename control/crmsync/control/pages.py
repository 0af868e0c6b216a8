"""The Workflows web page: sign-in, the table, Start/Stop and the edit form, over the supervisor."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from crmsync.control import config_form, limits, models, page_views, preview_table
from crmsync.control.api import error_response
from crmsync.control.auth import Authenticator, Principal, Role
from crmsync.control.dead_letters import DeadLetterFilter, RedriveBody
from crmsync.control.errors import ControlError, Invalid, TooManyAttempts
from crmsync.control.supervisor_protocol import Supervisor
from crmsync.control.throttle import FailureThrottle
from crmsync.streams import catalog
from crmsync.streams import config as configs

_Endpoint = Callable[[Request], Awaitable[Response]]
_HERE = Path(__file__).parent
_COOKIE = "crmsync_session"
#: The cookie's name whenever it is Secure: `__Host-` binds it to this host, path / and HTTPS.
_SECURE_COOKIE = "__Host-crmsync_session"
_SESSION_MAX_AGE_S = 12 * 3600
_PENDING_TIP = "edited; changes apply on the next Stop + Start"
#: Records the page's dry runs plan (the API's default).
_PREVIEW_RECORDS = 20
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_TRENDS = {
    "caught_up": "caught up",
    "draining": "draining",
    "growing": "growing",
    "stalled": "stalled",
    "steady": "steady",
}

templates = Jinja2Templates(directory=str(_HERE / "templates"))


def row(summary: models.WorkflowSummary) -> dict[str, Any]:
    """One table row as the template and the page's script both show it."""
    trend = _TRENDS.get(summary.trend, summary.trend)
    if summary.trend == "draining" and summary.eta_s is not None:
        trend += f", ETA {_duration(summary.eta_s)}"
    action = "start" if summary.status == "STOPPED" else "stop"
    reason = summary.error if summary.status == "FAILED" else None
    drifted = summary.status == "STOPPED" and summary.stopped_by == "drift"
    if drifted:
        reason = f"stopped_by: drift — {summary.reason}"
    return {
        **summary.model_dump(mode="json"),
        "backlog_text": f"{summary.backlog:,}",
        "trend_text": trend,
        "action": action,
        "busy": summary.status == "STARTING",
        "note": summary.error if summary.status != "FAILED" else None,
        "reason": reason,
        "drifted": drifted,
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class _Session:
    """The signed cookie's content: a CSRF token, a notice, and the id of a server-side session
    (never the token, nor who signed in: the server holds that, so signing out revokes it)."""

    csrf: str
    sid: str | None = None
    flash: str | None = None
    changed: bool = False
    principal: Principal | None = None

    def can(self, role: Role) -> bool:
        principal = self.principal
        return principal is not None and principal.role >= role

    def take_flash(self) -> str | None:
        flash, self.flash = self.flash, None
        self.changed = self.changed or flash is not None
        return flash


@dataclass
class _SignedIn:
    token: str  # the token's fingerprint (Authenticator.fingerprint), not the token
    expires: float


class _Sessions:
    """Signed cookies that name server-side sessions; a session lasts 12 h, until its sign-out,
    or until the token that opened it is no longer known."""

    def __init__(self, secret: bytes, authenticator: Authenticator, public_url: str | None) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt="crmsync.page-session")
        self._auth = authenticator
        self._https = bool(public_url and public_url.lower().startswith("https://"))
        self._signed_in: dict[str, _SignedIn] = {}

    def _secure(self, request: Request) -> bool:
        """`__Host-` and Secure unless a browser on this machine talks plain HTTP to us."""
        client = request.client.host if request.client else ""
        return self._https or request.url.scheme == "https" or not _loopback(client)

    def read(self, request: Request) -> _Session:
        raw = request.cookies.get(_SECURE_COOKIE if self._secure(request) else _COOKIE)
        if raw:
            try:
                data = self._signer.loads(raw, max_age=_SESSION_MAX_AGE_S)
                session = _Session(
                    csrf=str(data["csrf"]), sid=data.get("sid"), flash=data.get("flash")
                )
            except (BadSignature, KeyError, TypeError):
                pass
            else:
                session.principal = self._principal(session.sid)
                return session
        return _Session(csrf=secrets.token_urlsafe(24), changed=True)

    def _principal(self, sid: str | None) -> Principal | None:
        signed_in = self._signed_in.get(sid) if isinstance(sid, str) else None
        if signed_in is None:
            return None
        principal = self._auth.by_fingerprint(signed_in.token)
        if principal is None or signed_in.expires < time.monotonic():
            del self._signed_in[str(sid)]  # the token is gone, or the session is too old
            return None
        return principal

    def sign_in(self, token: str, principal: Principal) -> _Session:
        """A new session (and a new CSRF token: one planted before is worth nothing after)."""
        now = time.monotonic()
        for sid in [s for s, v in self._signed_in.items() if v.expires < now]:
            del self._signed_in[sid]
        sid = secrets.token_urlsafe(24)
        fingerprint = self._auth.fingerprint(token)
        self._signed_in[sid] = _SignedIn(fingerprint, now + _SESSION_MAX_AGE_S)
        return _Session(csrf=secrets.token_urlsafe(24), sid=sid, changed=True, principal=principal)

    def sign_out(self, session: _Session) -> None:
        if session.sid is not None:
            self._signed_in.pop(session.sid, None)

    def write(self, request: Request, response: Response, session: _Session) -> Response:
        response.headers.update(_HEADERS)
        if session.changed:
            data = {"csrf": session.csrf, "sid": session.sid}
            if session.flash:
                data["flash"] = session.flash
            secure = self._secure(request)
            response.set_cookie(
                _SECURE_COOKIE if secure else _COOKIE,
                self._signer.dumps(data),
                max_age=_SESSION_MAX_AGE_S,
                path="/",
                httponly=True,
                samesite="lax",
                secure=secure,
            )
        return response


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _csrf_ok(session: _Session, form: FormData) -> bool:
    given = form.get("csrf")
    return isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())


async def _form(request: Request) -> FormData:
    """The form, with our field and file limits (no form of ours uploads a file)."""
    return await request.form(
        max_files=limits.FORM_MAX_FILES,
        max_fields=limits.FORM_MAX_FIELDS,
        max_part_size=limits.FORM_LIMIT,
    )


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _local(target: str | None) -> str:
    """Only a path of ours to go back to after signing in (no //host, no scheme)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class _Pages:
    def __init__(
        self,
        authenticator: Authenticator,
        secret: bytes,
        throttle: FailureThrottle,
        public_url: str | None,
    ) -> None:
        self._auth = authenticator
        self._throttle = throttle
        self._sessions = _Sessions(secret, authenticator, public_url)

    # -- rendering ---------------------------------------------------------------------

    def _page(
        self,
        request: Request,
        session: _Session,
        template: str,
        context: dict[str, Any],
        status: int = 200,
    ) -> Response:
        context = {
            "session": session,
            "principal": session.principal,
            "csrf": session.csrf,
            "flash": session.take_flash(),
            "can_operate": session.can(Role.operator),
            "can_edit": session.can(Role.admin),
            "pending_tip": _PENDING_TIP,
            **context,
        }
        response = templates.TemplateResponse(request, template, context, status_code=status)
        return self._sessions.write(request, response, session)

    def _redirect(self, request: Request, session: _Session, to: str) -> Response:
        return self._sessions.write(request, RedirectResponse(to, 303), session)

    def _refuse(self, request: Request, session: _Session, status: int, message: str) -> Response:
        if _wants_json(request):
            return self._sessions.write(
                request, JSONResponse({"error": message, "detail": None}, status), session
            )
        context = {"title": "Refused", "message": message, "status": status}
        return self._page(request, session, "error.html", context, status)

    def _refuse_error(self, request: Request, session: _Session, error: ControlError) -> Response:
        """A supervisor's refusal, with the status its class carries (as the API answers it)."""
        if _wants_json(request):
            return self._sessions.write(request, error_response(error), session)
        return self._refuse(request, session, error.status, error.message)

    @staticmethod
    def _supervisor(request: Request) -> Supervisor:
        supervisor: Supervisor = request.app.state.supervisor
        return supervisor

    # -- sign-in -----------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        session = self._sessions.read(request)
        if session.principal is not None:
            return self._redirect(request, session, "/")
        context = {"next": _local(request.query_params.get("next")), "error": None}
        return self._page(request, session, "login.html", context)

    async def login(self, request: Request) -> Response:
        client = _client(request)
        session = self._sessions.read(request)
        try:
            self._throttle.check(client)
        except TooManyAttempts as error:
            return self._refuse_error(request, session, error)
        form = await _form(request)
        if not _csrf_ok(session, form):
            return self._refuse(request, session, 403, "The form expired: reload it and retry.")
        token = form.get("token")
        given = token.strip() if isinstance(token, str) else ""
        principal = self._auth.identify(given) if given else None
        target = _local(str(form.get("next") or "/"))
        if principal is None:
            self._throttle.failed(client)
            context = {"next": target, "error": "That token is not valid."}
            return self._page(request, session, "login.html", context, 401)
        return self._redirect(request, self._sessions.sign_in(given, principal), target)

    async def logout(self, request: Request) -> Response:
        session = self._sessions.read(request)
        form = await _form(request)
        if not _csrf_ok(session, form):
            return self._refuse(request, session, 403, "The form expired: reload it and retry.")
        self._sessions.sign_out(session)  # the cookie, captured or not, signs nobody in now
        fresh = _Session(csrf=secrets.token_urlsafe(24), flash="Signed out.", changed=True)
        return self._redirect(request, fresh, "/login")

    # -- the table ---------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        session = self._sessions.read(request)
        if session.principal is None:
            return self._redirect(request, session, "/login")
        rows: list[dict[str, Any]] = []
        sources: list[dict[str, Any]] = []
        problem = None
        try:
            rows = [row(s) for s in await self._supervisor(request).summaries()]
            sources = self._insight(request, rows)
        except ControlError as error:
            problem = error.message
        context = {"rows": rows, "problem": problem, "sources": sources}
        return self._page(request, session, "index.html", context)

    async def rows(self, request: Request) -> Response:
        session = self._sessions.read(request)
        if session.principal is None:
            return JSONResponse({"error": "sign in first", "detail": None}, 401, headers=_HEADERS)
        try:
            summaries = await self._supervisor(request).summaries()
        except ControlError as error:
            response = error_response(error)
            response.headers.update(_HEADERS)
            return response
        rows = [row(s) for s in summaries]
        sources = self._insight(request, rows)
        return JSONResponse({"workflows": rows, "sources": sources}, headers=_HEADERS)

    async def _operator_form(
        self, request: Request, doing: str
    ) -> tuple[_Session, FormData, Principal] | Response:
        """A posted form from a signed-in operator: its session, fields and who; else the
        refusal (an expired form, or a role too low for `doing`)."""
        session = self._sessions.read(request)
        form = await _form(request)
        if not _csrf_ok(session, form):
            return self._refuse(request, session, 403, "The form expired: reload it and retry.")
        principal = session.principal
        if principal is None or principal.role < Role.operator:
            return self._refuse(request, session, 403, f"{doing} needs an operator.")
        return session, form, principal

    async def toggle(self, request: Request) -> Response:
        checked = await self._operator_form(request, "Starting and stopping")
        if isinstance(checked, Response):
            return checked
        session, _, principal = checked
        name, action = request.path_params["name"], request.url.path.rsplit("/", 1)[-1]
        supervisor = self._supervisor(request)
        try:
            if action == "start":
                answer = await supervisor.start_workflow(name, principal)
            else:
                answer = await supervisor.stop_workflow(name, principal)
        except ControlError as error:
            if _wants_json(request):
                return self._refuse_error(request, session, error)
            session.flash, session.changed = error.message, True
            return self._redirect(request, session, "/")
        if _wants_json(request):
            body = {"name": name, "status": answer.status}
            return self._sessions.write(request, JSONResponse(body, 202), session)
        session.flash = f"{'Starting' if action == 'start' else 'Stopping'} {name}."
        session.changed = True
        return self._redirect(request, session, "/")

    # -- the edit form -----------------------------------------------------------------

    async def edit_form(self, request: Request) -> Response:
        session = self._sessions.read(request)
        if session.principal is None:
            return self._redirect(request, session, f"/login?next={request.url.path}")
        name = request.path_params["name"]
        try:
            config = self._supervisor(request).config(name)
            summary = await self._supervisor(request).summary(name)
        except ControlError as error:
            return self._refuse_error(request, session, error)
        form = config_form.from_config(name, config.pending or config.active)
        diff = [c.model_dump(mode="json") for c in config.pending_diff]
        context = {
            "row": row(summary), "form": form, "diff": diff if config.pending else None,
            "review": None, "reviewed": None,
        }  # fmt: skip
        return self._page(request, session, "edit.html", context)

    async def edit(self, request: Request) -> Response:
        session = self._sessions.read(request)
        form_data = await _form(request)
        if not _csrf_ok(session, form_data):
            return self._refuse(request, session, 403, "The form expired: reload it and retry.")
        principal = session.principal
        if principal is None:
            return self._refuse(request, session, 403, "Sign in first.")
        name = request.path_params["name"]
        supervisor = self._supervisor(request)
        try:
            current = supervisor.config(name)
            summary = await supervisor.summary(name)
        except ControlError as error:
            return self._refuse_error(request, session, error)
        data = {k: v for k, v in form_data.items() if isinstance(v, str)}
        config, form = config_form.parse(name, data, current.pending or current.active)
        context: dict[str, Any] = {"row": row(summary), "form": form, "diff": None}
        saving = form_data.get("action") == "save"
        if saving and principal.role < Role.admin:
            return self._refuse(request, session, 403, "Editing a config needs an admin.")
        parsed: configs.WorkflowConfig | None = None
        if not form.errors and not form.general:
            try:
                parsed = catalog.parse_config(name, config)
            except configs.ConfigError as error:
                form.add_errors(error.errors)
        if parsed is None:
            context |= {"review": None, "reviewed": None}
            return self._page(request, session, "edit.html", context, 422)
        pending = parsed.model_dump(mode="json")
        review = configs.config_diff(configs.redacted(current.active), configs.redacted(parsed))
        digest = _config_hash(pending)
        if saving and form_data.get("reviewed") == digest:
            try:
                await supervisor.edit_config(name, config, principal)
            except Invalid as error:
                form.add_errors(error.errors)
                context |= {"review": None, "reviewed": None}
                return self._page(request, session, "edit.html", context, 422)
            except ControlError as error:
                return self._refuse_error(request, session, error)
            session.changed = True
            session.flash = (
                f"Saved {name}'s changes: they apply on the next Stop + Start."
                if review
                else f"{name} has no pending changes: it runs its active config."
            )
            return self._redirect(request, session, "/")
        if saving:
            form.general.append("The form changed after the review: check the changes again.")
        context |= {"review": review, "reviewed": digest}
        if form_data.get("action") == "preview":
            context |= await self._preview(supervisor, name, pending)
        return self._page(request, session, "edit.html", context)

    async def _preview(
        self, supervisor: Supervisor, name: str, config: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The dry run's context for a template: the answer with its table lines, or why not."""
        try:
            answer = await supervisor.preview(name, config, _PREVIEW_RECORDS)
        except ControlError as error:
            return {"preview": None, "preview_problem": error.message}
        data = answer.model_dump(mode="json")
        for record in data["records"]:
            record["lines"] = preview_table.lines(record)
        return {"preview": data, "preview_problem": None}

    async def preview_page(self, request: Request) -> Response:
        """The pending edit tried on the newest records, with Start: what Start will apply."""
        session = self._sessions.read(request)
        if session.principal is None:
            return self._redirect(request, session, f"/login?next={request.url.path}")
        name = request.path_params["name"]
        supervisor = self._supervisor(request)
        try:
            config = supervisor.config(name)
            summary = await supervisor.summary(name)
        except ControlError as error:
            return self._refuse_error(request, session, error)
        context = {
            "row": row(summary),
            "diff": [c.model_dump(mode="json") for c in config.pending_diff],
        }
        context |= await self._preview(supervisor, name, None)
        return self._page(request, session, "preview.html", context)

    async def trace_page(self, request: Request) -> Response:
        """What happened to one record: each event that carried it and every workflow's
        outcome, newest first."""
        session = self._sessions.read(request)
        if session.principal is None:
            return self._redirect(request, session, "/login?next=/trace")
        key = request.query_params.get("key", "").strip()
        workflow = request.query_params.get("workflow")
        context: dict[str, Any] = {"key": key, "workflow": workflow, "trace": None}
        if key:
            if len(key) > 200:
                return self._refuse(request, session, 400, "A key is at most 200 characters.")
            try:
                context["trace"] = await self._supervisor(request).trace(key)
            except ControlError as error:
                return self._refuse_error(request, session, error)
        return self._page(request, session, "trace.html", context)

    # -- history, source and dead letters (issue 20) -----------------------------------

    def _insight(self, request: Request, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adds each row's history chart; returns the source rows."""
        supervisor = self._supervisor(request)
        now = time.time()
        for r in rows:
            r["history"] = page_views.chart(supervisor.history(r["name"]), now)
        return page_views.source_rows(supervisor.sources())

    async def dead_letter_page(self, request: Request) -> Response:
        session = self._sessions.read(request)
        if session.principal is None:
            return self._redirect(request, session, f"/login?next={request.url.path}")
        name = request.path_params["name"]
        query = {k: v for k, v in request.query_params.items() if v}
        where, problems = _filter(query)
        supervisor = self._supervisor(request)
        try:
            summary = await supervisor.summary(name)
            listing = await supervisor.dead_letter_listing(name, where, 200)
        except ControlError as error:
            return self._refuse_error(request, session, error)
        context = {
            "row": row(summary), "letters": listing.dead_letters, "complete": listing.complete,
            "filter": query, "problems": problems, "confirm": None,
        }  # fmt: skip
        return self._page(request, session, "dead_letters.html", context, 400 if problems else 200)

    async def redrive(self, request: Request) -> Response:
        checked = await self._operator_form(request, "Re-driving dead letters")
        if isinstance(checked, Response):
            return checked
        session, form, principal = checked
        name = request.path_params["name"]
        fields = {k: v for k, v in form.items() if isinstance(v, str) and v and k in _FILTERS}
        selected = [v for v in form.getlist("selected") if isinstance(v, str)]
        data: dict[str, Any] = dict(fields)
        if selected:
            try:
                data["offsets"] = [
                    {"partition": int(p), "offset": int(o)}
                    for p, o in (item.split("/", 1) for item in selected)
                ]
            except ValueError:
                return self._refuse(request, session, 400, "selected: not partition/offset pairs")
        confirmed = form.get("confirm") == "yes"
        try:
            body = RedriveBody.model_validate({**data, "dry_run": not confirmed})
        except ValueError as error:
            return self._refuse(request, session, 400, f"invalid filter: {error}")
        supervisor = self._supervisor(request)
        try:
            answer = await supervisor.redrive(name, body, principal)
            if confirmed:
                session.flash = (
                    f"Re-drove {len(answer.redriven)} dead letter(s) of {name}"
                    + (f"; skipped {len(answer.skipped)}" if answer.skipped else "")
                    + "."
                )
                session.changed = True
                return self._redirect(request, session, f"/workflows/{name}/dead-letters")
            summary = await supervisor.summary(name)
            listing = await supervisor.dead_letter_listing(name, DeadLetterFilter(), 200)
        except ControlError as error:
            return self._refuse_error(request, session, error)
        confirm = {
            "count": len(answer.redriven), "skipped": answer.skipped, "fields": fields,
            "selected": selected,
        }  # fmt: skip
        context = {
            "row": row(summary), "letters": listing.dead_letters, "complete": listing.complete,
            "filter": fields, "problems": [], "confirm": confirm,
        }  # fmt: skip
        return self._page(request, session, "dead_letters.html", context)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/login", _by_method(self.login_form, self.login), methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/workflows.json", self.rows, methods=["GET"]),
            Route("/workflows/{name}/start", self.toggle, methods=["POST"]),
            Route("/workflows/{name}/stop", self.toggle, methods=["POST"]),
            Route("/workflows/{name}/preview", self.preview_page, methods=["GET"]),
            Route("/trace", self.trace_page, methods=["GET"]),
            Route(
                "/workflows/{name}/edit",
                _by_method(self.edit_form, self.edit),
                methods=["GET", "POST"],
            ),
            Route("/workflows/{name}/dead-letters", self.dead_letter_page, methods=["GET"]),
            Route("/workflows/{name}/dead-letters/redrive", self.redrive, methods=["POST"]),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ]


def _by_method(get: _Endpoint, post: _Endpoint) -> _Endpoint:
    """One route per path, so a 405 names every method the path takes."""

    async def endpoint(request: Request) -> Response:
        return await (post if request.method == "POST" else get)(request)

    return endpoint


def routes(
    authenticator: Authenticator,
    session_secret: bytes | None = None,
    throttle: FailureThrottle | None = None,
    public_url: str | None = None,
) -> list[BaseRoute]:
    """The page's routes; without a secret, sessions last as long as this process."""
    secret = session_secret or secrets.token_bytes(32)
    return _Pages(authenticator, secret, throttle or FailureThrottle(), public_url).routes()


_FILTERS = ("reason", "error_class", "key", "since", "until")


def _filter(query: dict[str, str]) -> tuple[DeadLetterFilter, list[str]]:
    """The page's filter fields; a bad one is named and left out."""
    given = {k: v for k, v in query.items() if k in _FILTERS}
    try:
        return DeadLetterFilter.model_validate(given), []
    except ValidationError as error:
        bad = {str(e["loc"][0]) for e in error.errors()}
        problems = [f"{e['loc'][0]}: {e['msg']}" for e in error.errors()]
        kept = {k: v for k, v in given.items() if k not in bad}
        return DeadLetterFilter.model_validate(kept), problems


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"
