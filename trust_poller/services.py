"""The handlers' own HTTP client for trust-internal services (imaging-api, data-access-api).

Not the hub client: it never sends the hub's key, ignores proxies and ~/.netrc from the
environment, follows no redirects, and bounds every call in time and in bytes. Every failure
becomes one `ServiceError` whose text is safe to send to the hub: no headers, no secrets.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests

from trust_poller.http_body import BodyDeadline, declared_length, read_body
from trust_poller.kit import Kit
from trust_poller.payloads import MAX_JSON_DEPTH, nested_too_deep
from trust_poller.redact import Redactor

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.05
# The hub accepts results up to 10,000,000 characters; a bigger reply could never be sent.
DEFAULT_MAX_BYTES = 10_000_000
# The whole body must arrive within the read timeout plus this margin (slow-drip servers).
DEADLINE_MARGIN = 30.0
DETAIL_CHARS = 300
# Of an error answer only the start is read: enough for its `detail` or a short excerpt.
ERROR_BODY_BYTES = 65536
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")


class ServiceError(Exception):
    """A trust-internal call failed; `reason` is short, secret-free and names the service.

    `status_code` is the upstream HTTP status when one is known; `detail` is the upstream's
    own explanation (a JSON body's `detail`, or an excerpt of the body); `timed_out` means
    the request may have been received and acted on although no answer arrived in time.
    """

    def __init__(
        self,
        reason: str,
        status_code: int | None = None,
        timed_out: bool = False,
        *,
        detail: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code
        self.timed_out = timed_out
        self.detail = detail


@dataclass(frozen=True)
class ServiceReply:
    """A 2xx answer, fully read."""

    service: str
    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Any:
        """The body as JSON; a body that is not JSON is a failure of the call."""
        try:
            document = jsonlib.loads(self.body)
        except ValueError:
            what = "an empty body" if not self.body.strip() else "a body that is not JSON"
            raise ServiceError(
                f"{self.service} answered {self.status} with {what}, JSON was expected"
            ) from None
        except RecursionError:
            document = None
            deep = True
        else:
            deep = nested_too_deep(document)
        if deep:
            raise ServiceError(
                f"{self.service} answered {self.status} with JSON nested more than "
                f"{MAX_JSON_DEPTH} levels deep"
            )
        return document


def _excerpt(text: str, limit: int = DETAIL_CHARS) -> str:
    text = _SPACE.sub(" ", _TAG.sub(" ", text)).strip()
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"


def _upstream_detail(body: bytes) -> str:
    """The JSON body's `detail` (str()-ed) when there is one, else a short text excerpt."""
    text = body.decode("utf-8", errors="replace")
    try:
        document = jsonlib.loads(text)
    except (ValueError, RecursionError):
        return _excerpt(text)
    if isinstance(document, dict) and document.get("detail") is not None:
        return _excerpt(str(document["detail"]))
    return _excerpt(text)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and wrapped arguments (requests nests urllib3's)."""
    seen: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 12:
        current = pending.pop()
        if any(current is known for known in seen):
            continue
        seen.append(current)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    return seen


def _is_timeout(exc: BaseException) -> bool:
    return any(
        isinstance(item, requests.Timeout | TimeoutError) or "Timeout" in type(item).__name__
        for item in _exception_chain(exc)
    )


def _transport_problem(exc: BaseException) -> str:
    """A short, URL-free name for why the connection failed."""
    chain = _exception_chain(exc)
    text = " ".join(str(item) for item in chain).lower()
    if any(isinstance(item, ConnectionRefusedError) for item in chain) or "refused" in text:
        return "connection refused"
    if any(word in text for word in ("name or service not known", "resolve", "resolution")):
        return "host name does not resolve"
    if any(isinstance(item, requests.exceptions.SSLError) for item in chain):
        return "TLS handshake failed"
    if "reset by peer" in text or any(isinstance(item, ConnectionResetError) for item in chain):
        return "connection reset"
    if "unreachable" in text:
        return "network unreachable"
    if "incompleteread" in text or "connection broken" in text:
        return "connection closed before the whole answer arrived"
    return f"connection failed ({type(exc).__name__})"


class ServiceClient:
    """One session for all trust-internal calls, each bounded in time and bytes."""

    def __init__(
        self,
        kit: Kit,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        deadline_margin: float = DEADLINE_MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = {kit.internal_service_key_header: kit.internal_service_key}
        self._default_read_timeout = kit.internal_request_timeout
        self._max_bytes = max_bytes
        self._deadline_margin = deadline_margin
        self._clock = clock
        self._redactor = Redactor(kit.secrets())
        self._session = requests.Session()
        # Internal calls never go through a proxy and never pick up ~/.netrc credentials.
        self._session.trust_env = False
        # Calls are independent (and may run on several threads): no cookie carries over.
        self._session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
        service: str = "imaging-api",
    ) -> ServiceReply:
        """Make one call and read its whole 2xx answer, or raise ServiceError."""
        read = self._default_read_timeout if read_timeout is None else read_timeout
        request_headers = {"Accept": "application/json", **(headers or {}), **self._auth}
        deadline = self._clock() + read + self._deadline_margin
        started = time.monotonic()
        try:
            with self._session.request(
                method,
                url,
                json=json,
                params=params,
                headers=request_headers,
                timeout=(CONNECT_TIMEOUT, read),
                allow_redirects=False,
                stream=True,
            ) as response:
                status = response.status_code
                log.debug(
                    "%s %s -> %d after %.0f ms",
                    method,
                    url,
                    status,
                    (time.monotonic() - started) * 1000,
                )
                if 300 <= status < 400:
                    raise ServiceError(
                        f"{service} answered {status}, a redirect (not followed; "
                        "check its URL in the kit)",
                        status,
                    )
                if status >= 400:
                    excerpt = self._read_body(response, service, deadline, read, truncate=True)
                    # Scrubbed before it is cut to an excerpt too: a cut inside an echoed
                    # secret would leave a piece of it that no later scrub recognises.
                    text = self._redactor.scrub(excerpt.decode("utf-8", errors="replace"))
                    detail = _upstream_detail(text.encode()) or response.reason or "no detail"
                    detail = self._redactor.scrub(detail)
                    raise ServiceError(
                        f"{service} answered {status}: {detail}", status, detail=detail
                    )
                if status < 200:
                    raise ServiceError(f"{service} answered {status}, not a final answer", status)
                body = self._read_body(response, service, deadline, read, truncate=False)
                return ServiceReply(service, status, dict(response.headers), body)
        except ServiceError:
            raise
        except requests.exceptions.ConnectTimeout:
            raise ServiceError(
                f"{service} unreachable: no connection within {CONNECT_TIMEOUT:g} s"
            ) from None
        except requests.exceptions.ReadTimeout:
            raise ServiceError(
                f"{service} did not answer within {read:g} s", timed_out=True
            ) from None
        except requests.exceptions.ConnectionError as exc:
            raise ServiceError(f"{service} unreachable: {_transport_problem(exc)}") from None
        except requests.RequestException as exc:
            raise ServiceError(f"{service} call failed: {type(exc).__name__}") from None

    def _read_body(
        self,
        response: requests.Response,
        service: str,
        deadline: float,
        read: float,
        *,
        truncate: bool,
    ) -> bytes:
        """Read the body within the deadline; past the cap fail, or keep the start (errors)."""
        limit = ERROR_BODY_BYTES if truncate else self._max_bytes
        too_large = ServiceError(f"{service} response too large (over {limit:,} bytes)")
        declared = declared_length(response)
        if not truncate and declared is not None and declared > limit:
            raise too_large
        try:
            body = read_body(response, limit, deadline, self._clock)
        except BodyDeadline:
            raise ServiceError(
                f"{service} did not finish its answer within {read + self._deadline_margin:g} s",
                timed_out=True,
            ) from None
        except requests.RequestException as exc:
            if _is_timeout(exc):
                raise ServiceError(
                    f"{service} stopped sending its answer for over {read:g} s", timed_out=True
                ) from None
            raise ServiceError(f"{service} answer was cut off: {_transport_problem(exc)}") from None
        if len(body) > limit and not truncate:
            raise too_large
        return body[:limit]
