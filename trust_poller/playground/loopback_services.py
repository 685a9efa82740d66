"""The trust's internal services on one loopback port: data-access-api, imaging-api and XNAT.

Routes follow the task table of docs/hub-protocol.md, so DATA_ACCESS_API_URL, IMAGING_API_URL
and XNAT_URL can all be this server's `url`. Replies are shaped like the real services'
(cohort values come back as ints and floats, as data-access-api sends them).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from trust_poller.playground.http_server import LoopbackServer, RecordedRequest, Reply, json_reply

SERVICE_VERSION = "svc-1.2.3"
XNAT_VERSION = "1.8.10"
# Reachable without the internal key, like the real health endpoints.
PUBLIC_ROUTES = frozenset({"/health", "/xapi/siteConfig/buildInfo"})

Entry = TypeVar("Entry")
Route = Callable[[RecordedRequest, "re.Match[str]"], Reply]


@dataclass(frozen=True)
class ServiceCall:
    """One call as the services saw it; `finished_at` is None while it is being answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    started_at: float
    finished_at: float | None = None


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _unprocessable(detail: str) -> Reply:
    return json_reply(422, {"detail": detail})


def _strings(body: Any, *names: str) -> bool:
    return isinstance(body, dict) and all(isinstance(body.get(name), str) for name in names)


class LoopbackServices(LoopbackServer):
    def __init__(
        self,
        *,
        internal_key: str,
        internal_key_header: str = "X-Trust-Internal-Service-Key",
        admin_key: str | None = None,
    ) -> None:
        super().__init__()
        self.internal_key = internal_key
        self.internal_key_header = internal_key_header
        self.admin_key = admin_key
        self.created_projects: dict[str, int] = {}
        self._calls: list[ServiceCall] = []
        self._delays: dict[str, float] = {}
        self._failures: dict[str, Reply] = {}
        self._pacs_successful = True
        self._routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("POST", re.compile(r"/cohort"), self._cohort),
            ("POST", re.compile(r"/cohort/snapshot"), self._cohort_snapshot),
            (
                "POST",
                re.compile(r"/projects/create-project-from-central-hub-project"),
                self._create_project,
            ),
            ("DELETE", re.compile(r"/projects/([^/]+)"), self._delete_project),
            ("GET", re.compile(r"/retrieval/import_status_count/([^/]+)"), self._import_status),
            (
                "PUT",
                re.compile(r"/retrieval/reimport_imaging_project_studies/([^/]+)"),
                self._reimport,
            ),
            ("PUT", re.compile(r"/users"), self._update_user),
            ("GET", re.compile(r"/health"), self._health),
            ("GET", re.compile(r"/xapi/siteConfig/buildInfo"), self._build_info),
            ("GET", re.compile(r"/imaging/ping_pacs"), self._ping_pacs),
        ]

    @property
    def url(self) -> str:
        """What DATA_ACCESS_API_URL, IMAGING_API_URL and XNAT_URL can all be set to."""
        return self.base_url

    # --- test controls ---------------------------------------------------------------

    @property
    def calls(self) -> list[ServiceCall]:
        with self._lock:
            return list(self._calls)

    def set_delay(self, path_prefix: str, seconds: float) -> None:
        """Delay replies to paths starting so (0 removes it); stop() cuts a delay short."""
        with self._lock:
            if seconds > 0:
                self._delays[path_prefix] = seconds
            else:
                self._delays.pop(path_prefix, None)

    def set_failure(
        self,
        path_prefix: str,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> None:
        """Answer paths starting so with this status and body (e.g. an HTML 500 page)."""
        with self._lock:
            self._failures[path_prefix] = Reply(status, {"Content-Type": content_type}, body)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def set_pacs(self, successful: bool) -> None:
        with self._lock:
            self._pacs_successful = successful

    # --- serving ---------------------------------------------------------------------

    def handle(self, request: RecordedRequest) -> Reply | None:
        call = ServiceCall(
            method=request.method,
            path=request.route,
            query=request.path.partition("?")[2],
            headers=request.headers,
            body=_json_or_none(request.body),
            started_at=time.monotonic(),
        )
        with self._lock:
            index = len(self._calls)
            self._calls.append(call)
        try:
            return super().handle(request)
        finally:
            with self._lock:
                self._calls[index] = replace(call, finished_at=time.monotonic())

    def respond(self, request: RecordedRequest) -> Reply:
        route = request.route
        delay = self._by_prefix(self._delays, route)
        if delay is not None:
            self.pause(delay)
        failure = self._by_prefix(self._failures, route)
        if failure is not None:
            return failure
        if route not in PUBLIC_ROUTES:
            presented = request.header(self.internal_key_header)
            if presented is None or not secrets.compare_digest(presented, self.internal_key):
                return json_reply(401, {"detail": "Invalid or missing internal service key"})
        allowed = []
        for method, pattern, answer in self._routes:
            match = pattern.fullmatch(route)
            if match is None:
                continue
            if method == request.method:
                return answer(request, match)
            allowed.append(method)
        if allowed:
            return json_reply(405, {"detail": "Method Not Allowed"}, {"Allow": ", ".join(allowed)})
        return json_reply(404, {"detail": "Not Found"})

    def _by_prefix(self, table: dict[str, Entry], route: str) -> Entry | None:
        """The entry of the longest prefix of `route`, or None."""
        with self._lock:
            matches = [prefix for prefix in table if route.startswith(prefix)]
            return table[max(matches, key=len)] if matches else None

    # --- data-access-api -------------------------------------------------------------

    def _cohort(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        body = _json_or_none(request.body)
        if not _strings(body, "query_id", "trust_id", "query"):
            return _unprocessable("body needs string query_id, trust_id and query")
        data = [
            {"name": "gender_concept_id", "results": [{"value": 8507, "count": 20}]},
            {"name": "year_of_birth", "results": [{"value": 1970, "count": 12}]},
            {"name": "mean_age", "results": [{"value": 54.5, "count": 42}]},
        ]
        return json_reply(
            200,
            {
                "query_id": body["query_id"],
                "trust_id": body["trust_id"],
                "created": datetime.now(UTC).date().isoformat(),
                "record_count": 42,
                "data": data,
                "error": None,
                "suppressed": False,
            },
        )

    def _cohort_snapshot(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        presented = request.header("X-Cohort-Admin-Key")
        if self.admin_key is not None and (
            presented is None or not secrets.compare_digest(presented, self.admin_key)
        ):
            return json_reply(403, {"detail": "Invalid or missing cohort admin key"})
        body = _json_or_none(request.body)
        if not _strings(body, "query"):
            return _unprocessable("body needs a string query")
        return json_reply(
            200,
            {
                "row_count": 42,
                "columns": ["person_id", "gender_concept_id", "year_of_birth"],
                "snapshot_at": datetime.now(UTC).isoformat(),
                "query_hash": hashlib.sha256(body["query"].encode()).hexdigest(),
            },
        )

    # --- imaging-api -----------------------------------------------------------------

    def _create_project(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        body = _json_or_none(request.body)
        if not _strings(body, "project_id", "project_name"):
            return _unprocessable("body needs string project_id and project_name")
        users = body.get("users") or []
        created_users = [
            user["email"]
            for user in users
            if isinstance(user, dict)
            and isinstance(user.get("email"), str)
            and not user.get("is_disabled", False)
        ]
        with self._lock:
            self.created_projects[body["project_id"]] = (
                self.created_projects.get(body["project_id"], 0) + 1
            )
        xnat_id = "LOOPBACK_" + body["project_id"].replace("-", "")[:12].upper()
        return json_reply(
            200, {"ID": xnat_id, "name": body["project_name"], "created_users": created_users}
        )

    def _delete_project(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        return Reply(204)

    def _import_status(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        encoded_query = request.query.get("encoded_query")
        if not encoded_query:
            return _unprocessable("query parameter encoded_query is required")
        counts = {"QUEUED": 1, "IMPORTED": 3, "FAILED": 0}
        return json_reply(
            200, {"project_id": match[1], "encoded_query": encoded_query[0], "counts": counts}
        )

    def _reimport(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        if not request.query.get("encoded_query"):
            return _unprocessable("query parameter encoded_query is required")
        return json_reply(200, {"message": "Reimport started", "project_id": match[1]})

    def _update_user(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        body = _json_or_none(request.body)
        if not _strings(body, "email") or not isinstance(body.get("enabled"), bool):
            return _unprocessable("body needs a string email and a boolean enabled")
        return json_reply(200, {"message": "User updated", "email": body["email"]})

    def _health(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        return json_reply(200, {"status": "ok", "version": SERVICE_VERSION})

    def _build_info(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        return json_reply(200, {"version": XNAT_VERSION, "buildNumber": "loopback"})

    def _ping_pacs(self, request: RecordedRequest, match: re.Match[str]) -> Reply:
        with self._lock:
            return json_reply(200, {"successful": self._pacs_successful})
