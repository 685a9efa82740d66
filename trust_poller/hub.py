"""What the hub answers: the only module that speaks the hub's HTTP.

Every call: the kit's auth header, a (connect, read) timeout, a byte cap and a wall-clock
deadline on the reply, no redirects, no ~/.netrc, proxies from the standard environment
variables, TLS verified against HUB_CA_BUNDLE or the operating system's trust store.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import requests
import urllib3

from trust_poller.errors import HubUnavailable, KeyRejected
from trust_poller.kit import Kit
from trust_poller.pacing import Pacer
from trust_poller.payloads import nested_too_deep
from trust_poller.redact import Redactor

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.05
READ_TIMEOUT = 27.0
REPLY_DEADLINE = 60.0
SMALL_REPLY_CAP = 1 << 20
PENDING_REPLY_CAP = 64 << 20
# The hub's `detail` is kept to this many characters (it ends up in logs and short failures).
DETAIL_CHARS = 300
# Task types are short names; a longer one is refused, and never copied whole into logs.
MAX_TASK_TYPE_CHARS = 100
_409_STATUS = re.compile(r"status:\s*([A-Z_]+)")
_OS_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


def system_trust_store() -> str:
    """The operating system's CA store, where hospitals install their inspection CAs."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, *_OS_BUNDLES, paths.capath):
        if candidate and Path(candidate).exists():
            return candidate
    return requests.utils.DEFAULT_CA_BUNDLE_PATH


def tls_failure(exc: BaseException, verify: str, *, from_kit: bool) -> str:
    """Why verifying the hub failed, against which CA store, and the fix (never a bypass)."""
    reason = "the TLS handshake failed"
    pending: list[object] = [exc]
    for _ in range(16):  # requests wraps urllib3 wraps ssl; the bound only guards against cycles
        if not pending:
            break
        current = pending.pop(0)
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {current.verify_message or current.reason}"
            break
        if isinstance(current, ssl.SSLError) and current.reason:
            reason = f"TLS error: {current.reason}"
        if isinstance(current, BaseException):
            pending.extend(current.args)
            pending.extend(x for x in (current.__cause__, current.__context__) if x is not None)
            pending.append(getattr(current, "reason", None))
    if from_kit:
        store = f"HUB_CA_BUNDLE {verify}"
    else:
        store = (
            f"the system trust store {verify} (HUB_CA_BUNDLE is not set; REQUESTS_CA_BUNDLE "
            "and CURL_CA_BUNDLE are never used)"
        )
    return (
        f"TLS verification of the hub failed ({reason}) against {store}; fix: set "
        "HUB_CA_BUNDLE in the kit to the CA that signed the hub's certificate, or install "
        "that CA in the system trust store"
    )


class HubError(HubUnavailable):
    """No usable answer from the hub (transport, timeout, 5xx, 429, not the hub's JSON)."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after

    @property
    def reply_unusable(self) -> bool:
        """A 200 reply arrived but could not be used (too large, too slow, cut off, not JSON,
        wrong shape): for a poll, the hub has already marked its tasks IN_PROGRESS."""
        return self.status == 200


class HubRateLimited(HubError):
    """429: the key's budget is spent (another host may be polling with this kit)."""


class HubKeyRejected(KeyRejected):
    """401 (or 403 outside result posts): the hub does not accept this kit's API key."""


class SnapshotRejected(Exception):
    """422 on a heartbeat with a health snapshot: nothing was recorded."""


class Halted(Exception):
    """The daemon is stopping now; the request was not sent."""


@dataclass(frozen=True)
class Identity:
    trust_id: str
    trust_name: str


@dataclass(frozen=True)
class HeartbeatReply:
    identity: Identity
    hub_version: str | None
    hub_key_fingerprint: str | None


@dataclass(frozen=True)
class PendingTask:
    """One task from a poll; `problem` says why it cannot be run (it is failed, not dropped)."""

    id: str
    task_type: str
    payload: object
    created_at: str | None
    problem: str | None = None


class Answer(enum.Enum):
    ACKNOWLEDGED = "acknowledged"
    RETIRED = "retired"
    AWAIT_REDELIVERY = "await-redelivery"
    BODY_REFUSED = "body-refused"


@dataclass(frozen=True)
class ReportReply:
    answer: Answer
    detail: str


@dataclass(frozen=True)
class _Reply:
    status: int
    document: Any
    hub_json: bool
    retry_after: float | None
    detail: str = ""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, min(float(value), 3600.0)) if value else None
    except ValueError:
        return None


def _describe(exc: requests.RequestException | urllib3.exceptions.HTTPError) -> str:
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "the hub stopped sending its reply (read timed out)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "the connection was closed before the reply was complete"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS verification failed (check HUB_CA_BUNDLE or the system trust store)"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection to the hub timed out"
    if isinstance(exc, requests.Timeout):
        return "the hub did not answer in time"
    if isinstance(exc, requests.exceptions.ProxyError):
        return "the proxy refused or failed the connection"
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "Failed to resolve" in text:
        return "the hub's host name does not resolve"
    if "reset" in text.lower() or "aborted" in text.lower() or "RemoteDisconnected" in text:
        return "the connection was closed without a reply"
    return f"transport error ({type(exc).__name__})"


class HubClient:
    """One thread's client: its own Session, so its kept-alive connection is its own."""

    def __init__(
        self,
        kit: Kit,
        halt: threading.Event,
        *,
        on_identity: Callable[[Identity], None] | None = None,
        read_timeout: float = READ_TIMEOUT,
        reply_deadline: float = REPLY_DEADLINE,
    ) -> None:
        self.base_url = kit.hub_url
        self.halt = halt
        self.on_identity = on_identity
        self.timeout = (CONNECT_TIMEOUT, read_timeout)
        self.reply_deadline = reply_deadline
        # Per request, never on the session: REQUESTS_CA_BUNDLE would override Session.verify.
        self.verify = str(kit.hub_ca_bundle) if kit.hub_ca_bundle else system_trust_store()
        self._ca_from_kit = kit.hub_ca_bundle is not None
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc: it would replace the auth header
        self.proxies = requests.utils.get_environ_proxies(self.base_url)
        self.headers = {kit.api_key_header: kit.api_key, "Accept": "application/json"}
        self.redactor = Redactor(kit.secrets())

    def close(self) -> None:
        self.session.close()

    def _read(self, response: requests.Response, cap: int) -> bytes:
        status = response.status_code
        declared = response.headers.get("Content-Length", "")
        # isascii: "²".isdigit() is True, but int("²") raises.
        if declared.isascii() and declared.isdigit() and int(declared) > cap:
            raise HubError(
                f"reply of {int(declared):,} bytes is over the {cap:,}-byte cap", status=status
            )
        deadline = time.monotonic() + self.reply_deadline
        read_some = getattr(response.raw, "read1", None)
        chunks: list[bytes] = []
        size = 0
        while True:
            if read_some is not None:
                chunk = read_some(65536, decode_content=True)
            else:
                chunk = response.raw.read(65536, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                raise HubError(
                    f"reply is over the {cap:,}-byte cap; refused while reading", status=status
                )
            if time.monotonic() > deadline:
                raise HubError(
                    f"reply did not finish within {self.reply_deadline:.0f} s", status=status
                )
            chunks.append(chunk)

    def _request(
        self,
        method: str,
        path: str,
        pacer: Pacer | None,
        *,
        body: Any = None,
        cap: int = SMALL_REPLY_CAP,
    ) -> _Reply:
        if pacer is not None and not pacer.acquire(self.halt):
            raise Halted
        received: int | None = None  # the status, once a reply has started to arrive
        try:
            with self.session.request(
                method,
                self.base_url + path,
                json=body,
                headers=self.headers,
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
                stream=True,
                proxies=self.proxies,
            ) as response:
                received = response.status_code
                content = self._read(response, cap)
                status = response.status_code
                content_type = response.headers.get("Content-Type", "")
                retry_after = _retry_after(response.headers.get("Retry-After"))
        # The body is read from urllib3 directly, whose errors requests does not wrap.
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if isinstance(exc, requests.exceptions.SSLError):
                raise HubError(tls_failure(exc, self.verify, from_kit=self._ca_from_kit)) from None
            raise HubError(_describe(exc), status=received) from None
        document: Any = None
        hub_json = False
        if content and "json" in content_type.lower():
            try:
                document = json.loads(content)
                hub_json = isinstance(document, dict) and not nested_too_deep(document)
            except (UnicodeDecodeError, ValueError, RecursionError):  # nested past the stack
                document = None
            if not hub_json:
                document = None
        detail = ""
        if isinstance(document, dict):
            # Scrubbed before it is cut, so a cut inside an echoed secret leaves no piece of it.
            detail = self.redactor.scrub(str(document.get("detail", "")))[:DETAIL_CHARS]
        reply = _Reply(status, document, hub_json, retry_after, detail)
        if hub_json:
            self._note_identity(reply)
        return reply

    def _note_identity(self, reply: _Reply) -> None:
        document = reply.document
        if not isinstance(document, dict):
            return
        trust_id, trust_name = document.get("trust_id"), document.get("trust_name")
        if _is_text(trust_id) and _is_text(trust_name) and self.on_identity:
            self.on_identity(Identity(trust_id, trust_name))

    def _raise_for_trouble(self, reply: _Reply, what: str, pacer: Pacer | None) -> None:
        """Raise for anything that is not a usable answer; final refusals are the caller's."""
        if reply.status == 429:
            wait = reply.retry_after if reply.retry_after is not None else 60.0
            if pacer is not None:
                pacer.defer(wait)
            raise HubRateLimited(
                f"{what}: 429 rate limited (retry after {wait:.0f} s); another host may be "
                "polling with this kit",
                status=429,
                retry_after=wait,
            )
        if not reply.hub_json:
            raise HubError(
                f"{what}: HTTP {reply.status} that is not the hub's JSON (a proxy or load "
                "balancer answered)",
                status=reply.status,
            )
        if reply.status == 401:
            raise HubKeyRejected(
                f"{what}: the hub rejected the API key (401); check TRUST_API_KEY and "
                "TRUST_API_KEY_HEADER in the kit"
            )
        if reply.status >= 500:
            raise HubError(f"{what}: hub error {reply.status}", status=reply.status)

    def heartbeat(
        self, pacer: Pacer | None, snapshot: dict[str, Any] | None = None
    ) -> HeartbeatReply:
        reply = self._request("POST", "/trust/heartbeat", pacer, body=snapshot)
        self._raise_for_trouble(reply, "heartbeat", pacer)
        if reply.status == 422 and snapshot is not None:
            raise SnapshotRejected(reply.detail or "health snapshot rejected")
        if reply.status == 403:
            raise HubKeyRejected("heartbeat: the hub refused this key (403)")
        if reply.status != 200:
            raise HubError(f"heartbeat: unexpected HTTP {reply.status}", status=reply.status)
        identity = _identity_of(reply.document, "heartbeat")
        version = reply.document.get("hub_version")
        fingerprint = reply.document.get("aes_key_fingerprint")
        return HeartbeatReply(
            identity,
            version if isinstance(version, str) else None,
            fingerprint.lower() if isinstance(fingerprint, str) else None,
        )

    def pending_tasks(self, pacer: Pacer | None) -> tuple[Identity, list[PendingTask]]:
        reply = self._request("GET", "/tasks/pending", pacer, cap=PENDING_REPLY_CAP)
        self._raise_for_trouble(reply, "poll", pacer)
        if reply.status == 403:
            raise HubKeyRejected("poll: the hub refused this key (403)")
        if reply.status != 200:
            raise HubError(f"poll: unexpected HTTP {reply.status}", status=reply.status)
        identity = _identity_of(reply.document, "poll", status=200)
        items = reply.document.get("tasks")
        if not isinstance(items, list):
            raise HubError("poll: reply has no 'tasks' list", status=200)
        return identity, parse_tasks(items)

    def report_result(self, pacer: Pacer | None, task_id: str, body: dict[str, Any]) -> ReportReply:
        reply = self._request("POST", f"/tasks/{task_id}/result", pacer, body=body)
        self._raise_for_trouble(reply, f"result {task_id}", pacer)
        return read_refusal(reply.status, reply.detail)

    def post_cohort_results(self, body: dict[str, Any]) -> ReportReply:
        reply = self._request("POST", "/cohort/results", None, body=body)
        self._raise_for_trouble(reply, "cohort results", None)
        if reply.status == 200:
            return ReportReply(Answer.ACKNOWLEDGED, "cohort results recorded")
        if reply.status in (403, 404, 422):
            return ReportReply(Answer.BODY_REFUSED, f"{reply.status}: {reply.detail}")
        raise HubError(f"cohort results: unexpected HTTP {reply.status}", status=reply.status)


def read_refusal(status: int, detail: str) -> ReportReply:
    """The protocol page's "What a refusal means", for a reply that is the hub's own JSON."""
    if status == 200:
        return ReportReply(Answer.ACKNOWLEDGED, "result recorded")
    if status == 409:
        match = _409_STATUS.search(detail)
        current = match.group(1) if match else ""
        if current == "PENDING":
            return ReportReply(Answer.AWAIT_REDELIVERY, detail)
        if current in ("COMPLETED", "FAILED", "CANCELLED"):
            return ReportReply(Answer.RETIRED, detail)
        raise HubError(f"result: 409 without a final status ({detail})", status=409)
    if status in (403, 404):
        return ReportReply(Answer.RETIRED, f"{status}: {detail}")
    if status == 422:
        return ReportReply(Answer.BODY_REFUSED, detail)
    raise HubError(f"result: unexpected HTTP {status}", status=status)


def _identity_of(document: Any, what: str, *, status: int | None = None) -> Identity:
    trust_id, trust_name = document.get("trust_id"), document.get("trust_name")
    if not _is_text(trust_id) or not _is_text(trust_name):
        raise HubError(f"{what}: reply carries no trust_id/trust_name", status=status)
    return Identity(trust_id, trust_name)


def _is_text(value: object) -> TypeGuard[str]:
    """A string that UTF-8 can carry: JSON may hold lone surrogates ("\\ud800"), which no
    log line, state database or request body can."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value: str) -> str:
    return value if _is_text(value) else value.encode(errors="backslashreplace").decode()


def parse_tasks(items: list[Any]) -> list[PendingTask]:
    """Every item with a usable id becomes a task (a broken one is failed with a reason)."""
    tasks: list[PendingTask] = []
    seen: set[str] = set()
    for position, item in enumerate(items):
        raw_id = item.get("id") if isinstance(item, dict) else None
        try:
            task_id = str(uuid.UUID(raw_id)) if isinstance(raw_id, str) else None
        except ValueError:
            task_id = None
        if task_id is None:
            log.error("poll: task #%d has no usable id and cannot be run or reported", position)
            continue
        if task_id in seen:
            log.warning("poll: task %s appears twice in one reply; running it once", task_id)
            continue
        seen.add(task_id)
        task_type = item.get("task_type")
        created_at = item.get("created_at")
        payload = item.get("payload")
        problem = None
        if not isinstance(task_type, str) or not task_type:
            problem, task_type = "task has no task_type", ""
        elif not _is_text(task_type):
            problem = "task_type is not valid text (it holds a lone UTF-16 surrogate)"
            task_type = _as_text(task_type[:MAX_TASK_TYPE_CHARS])
        elif len(task_type) > MAX_TASK_TYPE_CHARS:
            problem = f"task_type is too long to be a task type ({len(task_type):,} characters)"
            task_type = task_type[:MAX_TASK_TYPE_CHARS]
        elif "payload" not in item:
            problem = "task has no payload"
        tasks.append(
            PendingTask(
                task_id,
                task_type,
                _as_text(payload) if isinstance(payload, str) else payload,
                _as_text(created_at) if isinstance(created_at, str) else None,
                problem,
            )
        )
    return tasks
