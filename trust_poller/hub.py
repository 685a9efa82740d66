"""What the hub answers: the only module that speaks the hub's HTTP.

Every call: the kit's auth header, a (connect, read) timeout, a byte cap and a wall-clock
deadline on the reply, no redirects, no ~/.netrc, proxies from the standard environment
variables, TLS verified against HUB_CA_BUNDLE or the operating system's trust store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from trust_poller.http_body import BodyDeadline, declared_length, read_body
from trust_poller.hub_replies import (
    Answer,
    Halted,
    HeartbeatReply,
    HubError,
    HubKeyRejected,
    HubRateLimited,
    Identity,
    PendingTask,
    ReportReply,
    SnapshotRejected,
    identity_of,
    is_text,
    parse_tasks,
    read_refusal,
)
from trust_poller.kit import Kit
from trust_poller.pacing import Pacer
from trust_poller.payloads import nested_too_deep
from trust_poller.redact import Redactor
from trust_poller.tls import PinnedTrustAdapter, system_trust_store, tls_failure

log = logging.getLogger(__name__)

# Re-exported: callers take the hub's vocabulary from the hub module.
__all__ = [
    "CONNECT_TIMEOUT",
    "PENDING_REPLY_CAP",
    "READ_TIMEOUT",
    "REPLY_DEADLINE",
    "SMALL_REPLY_CAP",
    "Answer",
    "Halted",
    "HeartbeatReply",
    "HubClient",
    "HubError",
    "HubKeyRejected",
    "HubRateLimited",
    "Identity",
    "PendingTask",
    "ReportReply",
    "SnapshotRejected",
    "parse_tasks",
    "read_refusal",
    "system_trust_store",
]

CONNECT_TIMEOUT = 3.05
READ_TIMEOUT = 27.0
REPLY_DEADLINE = 60.0
SMALL_REPLY_CAP = 1 << 20
PENDING_REPLY_CAP = 64 << 20
# The hub's `detail` is kept to this many characters (it ends up in logs and short failures).
DETAIL_CHARS = 300


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
    # Mid-body failures come wrapped as iter_content wraps them (see http_body.read_body).
    inner = exc.args[0] if exc.args else None
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError) or (
        type(exc) is requests.exceptions.ConnectionError
        and isinstance(inner, urllib3.exceptions.ReadTimeoutError)
    ):
        return "the hub stopped sending its reply (read timed out)"
    if isinstance(exc, urllib3.exceptions.ProtocolError | requests.exceptions.ChunkedEncodingError):
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
        # An unusable store is not mounted: each request then fails saying why (tls_failure).
        # Plain http (loopback only) needs no context, so none is built for it.
        if self.base_url.startswith("https://"):
            with contextlib.suppress(ssl.SSLError):
                self.session.mount("https://", PinnedTrustAdapter(self.verify))
        self.proxies = requests.utils.get_environ_proxies(self.base_url)
        self.headers = {kit.api_key_header: kit.api_key, "Accept": "application/json"}
        self.redactor = Redactor(kit.secrets())

    def close(self) -> None:
        self.session.close()

    def _read(self, response: requests.Response, cap: int, what: str) -> bytes:
        status = response.status_code
        declared = declared_length(response)
        if declared is not None and declared > cap:
            raise HubError(
                f"{what}: reply of {declared:,} bytes is over the {cap:,}-byte cap", status=status
            )
        try:
            content = read_body(response, cap, time.monotonic() + self.reply_deadline)
        except BodyDeadline:
            raise HubError(
                f"{what}: reply did not finish within {self.reply_deadline:.0f} s", status=status
            ) from None
        if len(content) > cap:
            raise HubError(
                f"{what}: reply is over the {cap:,}-byte cap; refused while reading", status=status
            )
        return content

    def _request(
        self,
        method: str,
        path: str,
        pacer: Pacer | None,
        what: str,
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
                content = self._read(response, cap, what)
                status = response.status_code
                content_type = response.headers.get("Content-Type", "")
                retry_after = _retry_after(response.headers.get("Retry-After"))
        # The body is read from urllib3 directly, whose errors requests does not wrap.
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if isinstance(exc, requests.exceptions.SSLError):
                failed = tls_failure(exc, self.verify, from_kit=self._ca_from_kit)
                raise HubError(f"{what}: {failed}") from None
            raise HubError(f"{what}: {_describe(exc)}", status=received) from None
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
        if is_text(trust_id) and is_text(trust_name) and self.on_identity:
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
        reply = self._request("POST", "/trust/heartbeat", pacer, "heartbeat", body=snapshot)
        self._raise_for_trouble(reply, "heartbeat", pacer)
        if reply.status == 422 and snapshot is not None:
            raise SnapshotRejected(reply.detail or "health snapshot rejected")
        if reply.status == 403:
            raise HubKeyRejected("heartbeat: the hub refused this key (403)")
        if reply.status != 200:
            raise HubError(f"heartbeat: unexpected HTTP {reply.status}", status=reply.status)
        identity = identity_of(reply.document, "heartbeat")
        version = reply.document.get("hub_version")
        fingerprint = reply.document.get("aes_key_fingerprint")
        return HeartbeatReply(
            identity,
            version if isinstance(version, str) else None,
            fingerprint.lower() if isinstance(fingerprint, str) else None,
        )

    def pending_tasks(self, pacer: Pacer | None) -> tuple[Identity, list[PendingTask]]:
        reply = self._request("GET", "/tasks/pending", pacer, "poll", cap=PENDING_REPLY_CAP)
        self._raise_for_trouble(reply, "poll", pacer)
        if reply.status == 403:
            raise HubKeyRejected("poll: the hub refused this key (403)")
        if reply.status != 200:
            raise HubError(f"poll: unexpected HTTP {reply.status}", status=reply.status)
        identity = identity_of(reply.document, "poll", status=200)
        items = reply.document.get("tasks")
        if not isinstance(items, list):
            raise HubError("poll: reply has no 'tasks' list", status=200)
        return identity, parse_tasks(items)

    def report_result(self, pacer: Pacer | None, task_id: str, body: dict[str, Any]) -> ReportReply:
        reply = self._request(
            "POST", f"/tasks/{task_id}/result", pacer, f"result {task_id}", body=body
        )
        self._raise_for_trouble(reply, f"result {task_id}", pacer)
        return read_refusal(reply.status, reply.detail)

    def post_cohort_results(self, body: dict[str, Any]) -> ReportReply:
        reply = self._request("POST", "/cohort/results", None, "cohort results", body=body)
        self._raise_for_trouble(reply, "cohort results", None)
        if reply.status == 200:
            return ReportReply(Answer.ACKNOWLEDGED, "cohort results recorded")
        if reply.status in (403, 404, 422):
            return ReportReply(Answer.BODY_REFUSED, f"{reply.status}: {reply.detail}")
        raise HubError(f"cohort results: unexpected HTTP {reply.status}", status=reply.status)
