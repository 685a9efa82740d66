"""A loopback emulator of the FLIP hub, faithful to docs/hub-protocol.md, for the demo and tests.

It keeps one trust's task table, seals payloads exactly as the hub does, enforces the same
auth, schemas, status codes and (optionally) rate limits and reaper, and can be told to
fail the way hubs and the proxies in front of them fail.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Self

from trust_poller import crypto
from trust_poller.playground import hub_rules
from trust_poller.playground.http_server import (
    LoopbackServer,
    RecordedRequest,
    Reply,
    html_page,
    json_reply,
)
from trust_poller.playground.hub_tasks import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    PENDING,
    TaskSnapshot,
    TaskTable,
    canonical_id,
)

API_PREFIX = "/api"
# Keys of `rate_limited`, one per limited endpoint.
HEARTBEAT, POLL, RESULT = "heartbeat", "poll", "result"
_RESULT_ROUTE = re.compile(r"/tasks/([^/]+)/result")
_NOT_JSON = object()


@dataclass(frozen=True)
class Heartbeat:
    at: float
    snapshot: dict[str, Any] | None


class LoopbackHub(LoopbackServer):
    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_key_header: str = "Authorization",
        aes_key: bytes | None = None,
        trust_id: str | None = None,
        trust_name: str = "Loopback Trust",
        hub_version: str | None = "loopback-1",
        report_fingerprint: bool = True,
        fingerprint_override: str | None = None,
        heartbeats_per_minute: float | None = None,
        polls_per_minute: float | None = None,
        results_per_minute: float | None = None,
        rate_window: float = hub_rules.WINDOW_SECONDS,
        max_tasks_per_poll: int = 50,
        requeue_after: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(tls=tls)
        self.api_key = api_key if api_key is not None else secrets.token_urlsafe(32)
        self.api_key_header = api_key_header
        self.aes_key = aes_key if aes_key is not None else os.urandom(crypto.KEY_BYTES)
        if len(self.aes_key) != crypto.KEY_BYTES:
            raise ValueError("the hub's AES key must be exactly 32 bytes")
        self.trust_id = trust_id if trust_id is not None else str(uuid.uuid4())
        self.trust_name = trust_name
        self.hub_version = hub_version
        self.report_fingerprint = report_fingerprint
        self.fingerprint_override = fingerprint_override
        self.max_tasks_per_poll = max_tasks_per_poll
        if requeue_after is not None and not requeue_after > 0:
            raise ValueError("requeue_after must be above 0 seconds (or None: reaper off)")
        self.requeue_after = requeue_after
        limits = {
            HEARTBEAT: heartbeats_per_minute,
            POLL: polls_per_minute,
            RESULT: results_per_minute,
        }
        self._limits = {
            name: hub_rules.SlidingWindow(per_minute, rate_window)
            for name, per_minute in limits.items()
            if per_minute is not None
        }
        self._rate_limited = dict.fromkeys(limits, 0)
        self._tasks = TaskTable()
        self._heartbeats: list[Heartbeat] = []
        self._cohort_results: dict[tuple[str, str], Any] = {}
        self._cohort_posts: list[Any] = []
        self._refusal: Reply | None = None
        self._claimed_trust_id: str | None = None
        self._reaper: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The hub base URL a kit's CENTRAL_HUB_API_URL holds."""
        return self.base_url + API_PREFIX

    @property
    def aes_key_base64(self) -> str:
        return base64.b64encode(self.aes_key).decode()

    def kit_values(self) -> dict[str, str]:
        """The hub-side keys of a kit for this hub."""
        return {
            "CENTRAL_HUB_API_URL": self.url,
            "TRUST_API_KEY": self.api_key,
            "TRUST_API_KEY_HEADER": self.api_key_header,
            "AES_KEY_BASE64": self.aes_key_base64,
            "EXPECTED_TRUST_ID": self.trust_id,
        }

    def start(self) -> Self:
        super().start()
        if self.requeue_after is not None:
            self._reaper = threading.Thread(
                target=self._reap_forever, name="hub-reaper", daemon=True
            )
            self._reaper.start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._reaper is not None:
            self._reaper.join()

    def _reap_forever(self) -> None:
        interval = min((self.requeue_after or 0.0) / 4, 1.0)
        while not self._stopping.wait(interval):
            self.reap()

    # --- tasks -----------------------------------------------------------------------

    def enqueue(
        self,
        task_type: str,
        payload: dict[str, Any],
        *,
        task_id: str | None = None,
        trust_id: str | None = None,
    ) -> str:
        """Seal `payload` as the hub does and queue it; returns the task id."""
        context = crypto.task_context(task_type)
        envelope = crypto.seal_envelope(self.aes_key, json.dumps(payload).encode(), context)
        return self.enqueue_envelope(task_type, envelope, task_id, trust_id=trust_id)

    def enqueue_envelope(
        self,
        task_type: str,
        envelope: str,
        task_id: str | None = None,
        *,
        trust_id: str | None = None,
    ) -> str:
        """Queue a raw (possibly tampered) payload; `trust_id` makes it another trust's task."""
        task_id = task_id if task_id is not None else str(uuid.uuid4())
        task = TaskSnapshot(
            id=task_id,
            task_type=task_type,
            payload=envelope,
            trust_id=trust_id if trust_id is not None else self.trust_id,
            status=PENDING,
            enqueued_at=time.monotonic(),
        )
        with self._lock:
            self._tasks.add(task)
        return task_id

    def cancel(self, task_id: str) -> None:
        with self._lock:
            task = self._tasks.find(task_id)
            if task is None:
                raise KeyError(task_id)
            task.status = CANCELLED

    def task(self, task_id: str) -> TaskSnapshot:
        """A copy of the task as the hub holds it; KeyError when unknown."""
        with self._lock:
            return self._tasks.copy_of(task_id)

    def tasks(self) -> list[TaskSnapshot]:
        with self._lock:
            return self._tasks.copies()

    def reap(self, older_than: float | None = None) -> int:
        """One reaper pass now (default age: requeue_after, or 0); returns tasks touched."""
        limit = older_than if older_than is not None else (self.requeue_after or 0.0)
        with self._lock:
            return self._tasks.reap(limit, time.monotonic())

    # --- what tests read -------------------------------------------------------------

    @property
    def heartbeats(self) -> list[Heartbeat]:
        with self._lock:
            return list(self._heartbeats)

    @property
    def cohort_results(self) -> dict[tuple[str, str], Any]:
        """The last accepted body per (query_id, trust_id), as posted."""
        with self._lock:
            return dict(self._cohort_results)

    @property
    def cohort_posts(self) -> list[Any]:
        """Every body posted to /cohort/results, refused ones too."""
        with self._lock:
            return list(self._cohort_posts)

    @property
    def rate_limited(self) -> dict[str, int]:
        """How many 429s each limited endpoint (HEARTBEAT, POLL, RESULT) answered."""
        with self._lock:
            return dict(self._rate_limited)

    def count(self, method: str, path_prefix: str) -> int:
        """Requests by method and path prefix, given with or without the /api prefix."""
        if not path_prefix.startswith(API_PREFIX):
            path_prefix = API_PREFIX + path_prefix
        return super().count(method, path_prefix)

    # --- fault injection (set_outage and override come from LoopbackServer) ------------

    def refuse_results(
        self, status: int | None, detail: str = "Refused by the loopback hub", hub_json: bool = True
    ) -> None:
        """Answer result posts with `status` (hub JSON, or a proxy's HTML page); None restores."""
        refusal = None
        if status is not None:
            refusal = (
                json_reply(status, {"detail": detail}) if hub_json else html_page(status, detail)
            )
        with self._lock:
            self._refusal = refusal

    def identity_override(self, trust_id: str | None) -> None:
        """Claim another trust id in replies (simulates the wrong kit on this host)."""
        with self._lock:
            self._claimed_trust_id = trust_id

    # --- the hub's endpoints ---------------------------------------------------------

    def respond(self, request: RecordedRequest) -> Reply:
        route = request.route.removeprefix(API_PREFIX) if request.route.startswith("/api/") else ""
        result_route = _RESULT_ROUTE.fullmatch(route)
        if route == "/trust/heartbeat":
            allowed, reply = "POST", self._heartbeat
        elif route == "/tasks/pending":
            allowed, reply = "GET", self._pending
        elif route == "/cohort/results":
            allowed, reply = "POST", self._cohort
        elif result_route is not None:
            allowed, reply = "POST", self._result
        else:
            return json_reply(404, {"detail": "Not Found"})
        if request.method != allowed:
            return json_reply(405, {"detail": "Method Not Allowed"}, {"Allow": allowed})
        presented = request.header(self.api_key_header)
        if presented is None or not secrets.compare_digest(presented, self.api_key):
            return json_reply(401, {"detail": "Invalid API key"}, {"WWW-Authenticate": "ApiKey"})
        return reply(request)

    def _identity(self) -> dict[str, str]:
        with self._lock:
            claimed = self._claimed_trust_id
        return {"trust_id": claimed or self.trust_id, "trust_name": self.trust_name}

    def _rate_limit(self, endpoint: str) -> Reply | None:
        with self._lock:
            window = self._limits.get(endpoint)
            wait = None if window is None else window.admit(time.monotonic())
            if wait is None:
                return None
            self._rate_limited[endpoint] += 1
        retry_after = str(max(1, math.ceil(wait)))
        return json_reply(429, {"detail": "Rate limit exceeded"}, {"Retry-After": retry_after})

    def _heartbeat(self, request: RecordedRequest) -> Reply:
        limited = self._rate_limit(HEARTBEAT)
        if limited is not None:
            return limited
        snapshot = _parse(request.body) if request.body.strip() else None
        if snapshot is _NOT_JSON:
            problems = [hub_rules.problem(("body",), "JSON decode error", "json_invalid")]
        else:
            problems = [] if snapshot is None else hub_rules.snapshot_problems(snapshot)
        if problems:
            return json_reply(422, {"detail": problems})
        with self._lock:
            self._heartbeats.append(Heartbeat(time.monotonic(), snapshot))
        reply: dict[str, Any] = {**self._identity(), "message": "Heartbeat recorded"}
        if self.report_fingerprint:
            fingerprint = self.fingerprint_override or crypto.key_fingerprint(self.aes_key)
            reply |= {"hub_version": self.hub_version, "aes_key_fingerprint": fingerprint}
        return json_reply(200, reply)

    def _pending(self, request: RecordedRequest) -> Reply:
        limited = self._rate_limit(POLL)
        if limited is not None:
            return limited
        with self._lock:
            claimed = self._tasks.claim(self.trust_id, self.max_tasks_per_poll, time.monotonic())
            tasks = [task.wire_form() for task in claimed]
        return json_reply(200, {**self._identity(), "tasks": tasks})

    def _result(self, request: RecordedRequest) -> Reply:
        task_id = request.route.split("/")[-2]
        body = _parse(request.body)
        with self._lock:
            task = self._tasks.find(task_id)
            if task is not None:
                task.results_received.append(request.body if body is _NOT_JSON else body)
            refusal = self._refusal
        limited = self._rate_limit(RESULT)
        if limited is not None:
            return limited
        if refusal is not None:
            return refusal
        if body is _NOT_JSON:
            problems = [hub_rules.problem(("body",), "JSON decode error", "json_invalid")]
        else:
            problems = hub_rules.result_problems(body)
        if not hub_rules.is_uuid(task_id):
            problems.insert(
                0, hub_rules.problem(("path", "task_id"), "Input should be a valid UUID", "uuid")
            )
        if problems:
            return json_reply(422, {"detail": problems})
        with self._lock:
            if task is None:
                return json_reply(404, {"detail": "Task not found"})
            if canonical_id(task.trust_id) != canonical_id(self.trust_id):
                return json_reply(403, {"detail": "Task belongs to another trust"})
            if task.status != IN_PROGRESS:
                detail = f"Task {task.id} is not in progress (status: {task.status})"
                return json_reply(409, {"detail": detail})
            task.status = COMPLETED if body["success"] else FAILED
            task.success, task.result = body["success"], body["result"]
            task.finished_at = time.monotonic()
        message = f"Task {task.id} result recorded"
        return json_reply(200, {**self._identity(), "message": message})

    def _cohort(self, request: RecordedRequest) -> Reply:
        body = _parse(request.body)
        with self._lock:
            self._cohort_posts.append(request.body if body is _NOT_JSON else body)
        problems = hub_rules.cohort_problems(body)
        if problems:
            return json_reply(422, {"detail": problems})
        if canonical_id(body["trust_id"]) != canonical_id(self.trust_id):
            return json_reply(403, {"detail": "Cannot submit cohort results for another trust"})
        with self._lock:
            self._cohort_results[(body["query_id"], body["trust_id"])] = body
        return json_reply(200, {"message": "Cohort results processed successfully"})


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return _NOT_JSON
