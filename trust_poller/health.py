"""The health snapshot sent on heartbeats: one round of probes of the trust's own services.

A background loop (`HealthCollector.run`) refreshes the snapshot every
HEALTH_COLLECT_INTERVAL_SECONDS; the heartbeat only reads `latest()`, which never blocks on
a probe. A round that fails, hangs past its deadline or is too old yields None, so the
heartbeat goes without a body rather than showing the hub a frozen green.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from trust_poller import __version__
from trust_poller.http_body import BodyDeadline, read_body
from trust_poller.kit import Kit

log = logging.getLogger(__name__)

ROUND_DEADLINE_SECONDS = 5.0
PROBE_TIMEOUT = (1.0, 2.0)  # (connect, read) seconds for every HTTP probe
MAX_RESPONSE_MS = 1_000_000
MAX_VERSION_CHARS = 64
_BODY_LIMIT = 64 * 1024
_UP_STATUSES = ("healthy", "degraded")
Grade = tuple[str, str | None, str]  # (status, version, note for the log)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw; `reason` is for the log only and never leaves the process."""

    status: str
    version: str | None = None
    response_ms: int | None = None
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "version": self.version, "response_ms": self.response_ms}


class HealthCollector:
    """Probes the trust's internal services and keeps the latest snapshot for heartbeats."""

    def __init__(
        self,
        kit: Kit,
        *,
        version: str = __version__,
        clock: Callable[[], float] = time.monotonic,
        deadline: float = ROUND_DEADLINE_SECONDS,
        probe_timeout: tuple[float, float] = PROBE_TIMEOUT,
    ) -> None:
        self._kit = kit
        self._version = _usable_version(version)
        self._clock = clock
        self._deadline = deadline
        self._probe_timeout = probe_timeout
        self._session = requests.Session()
        self._session.trust_env = False  # internal calls never use a proxy, netrc or env CA
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._completed_at = 0.0
        self._in_flight: set[threading.Thread] = set()
        self._last_statuses: dict[str, str] = {}
        self._round_failing = False

    def latest(self) -> dict[str, Any] | None:
        """The last snapshot if it is fresh enough to send, else None (send no body)."""
        with self._lock:
            if self._snapshot is None:
                return None
            age = self._clock() - self._completed_at
            if age > self._kit.health_collect_interval + self._deadline:
                return None
            return copy.deepcopy(self._snapshot)

    def collect_round(self) -> dict[str, Any] | None:
        """Probe every service once; remember and return the snapshot (None: the round failed).

        Meant for one thread at a time: the one running `run`, or a test.
        """
        return self._collect_and_store(None)

    def run(self, stop: threading.Event) -> None:
        """Refresh the snapshot every health_collect_interval seconds until `stop` is set."""
        while not stop.is_set():
            self._collect_and_store(stop)
            stop.wait(self._kit.health_collect_interval)

    def close(self) -> None:
        """Give probes still in flight a moment to finish, then close the HTTP session."""
        give_up_at = time.monotonic() + sum(self._probe_timeout)
        with self._lock:
            in_flight = list(self._in_flight)
        for thread in in_flight:
            thread.join(max(0.0, give_up_at - time.monotonic()))
        self._session.close()

    def _collect_and_store(self, stop: threading.Event | None) -> dict[str, Any] | None:
        try:
            snapshot = self._collect(stop)
        except Exception as exc:  # a broken round must cost the snapshot, not the loop
            log.debug("health round raised %s", type(exc).__name__, exc_info=True)
            snapshot = None
            self._note_round_failure(f"raised {type(exc).__name__}")
        if stop is not None and stop.is_set():
            return None
        with self._lock:
            self._snapshot = snapshot
            self._completed_at = self._clock()
        return copy.deepcopy(snapshot)

    def _collect(self, stop: threading.Event | None) -> dict[str, Any] | None:
        round_deadline = time.monotonic() + self._deadline
        futures = {
            name: self._start_probe(name, probe, round_deadline)
            for name, probe in self._probes().items()
        }
        pending: set[Future[ProbeResult]] = set(futures.values())
        while pending:
            remaining = round_deadline - time.monotonic()
            if remaining <= 0:
                self._note_round_failure(f"exceeded its {self._deadline:g} s deadline")
                return None
            if stop is not None and stop.is_set():
                return None
            # Wake now and then only when a stop event has to be watched.
            _, pending = wait(pending, timeout=remaining if stop is None else min(remaining, 0.1))
        results = {name: future.result() for name, future in futures.items()}
        self._note_statuses(results)
        return {
            "services": {name: result.as_json() for name, result in results.items()},
            "collected_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

    def _probes(self) -> dict[str, Callable[[float], ProbeResult]]:
        kit = self._kit
        internal_key = {kit.internal_service_key_header: kit.internal_service_key}
        return {
            "trust-api": lambda _: ProbeResult("healthy", self._version, 0),
            "imaging-api": lambda deadline: self._probe_http(
                f"{kit.imaging_api_url}/health", deadline, _grade_health_endpoint
            ),
            "data-access-api": lambda deadline: self._probe_http(
                f"{kit.data_access_api_url}/health", deadline, _grade_health_endpoint
            ),
            "xnat": lambda deadline: self._probe_http(
                f"{kit.xnat_url}/xapi/siteConfig/buildInfo", deadline, _grade_xnat
            ),
            "dicom": lambda deadline: self._probe_http(
                f"{kit.imaging_api_url}/imaging/ping_pacs",
                deadline,
                _grade_ping_pacs,
                headers=internal_key,
            ),
            "omop": lambda _: self._probe_tcp(kit.omop_db_host, kit.omop_db_port),
        }

    def _start_probe(
        self, name: str, probe: Callable[[float], ProbeResult], round_deadline: float
    ) -> Future[ProbeResult]:
        future: Future[ProbeResult] = Future()

        def run_probe() -> None:
            try:
                future.set_result(probe(round_deadline))
            except Exception as exc:  # a probe bug makes that one service unknown
                log.debug("health probe %s raised %s", name, type(exc).__name__, exc_info=True)
                future.set_result(
                    ProbeResult("unknown", reason=f"probe raised {type(exc).__name__}")
                )
            finally:
                with self._lock:
                    self._in_flight.discard(threading.current_thread())

        # Daemon threads: a probe stuck in DNS must never hold up the process's exit.
        thread = threading.Thread(target=run_probe, name=f"health-{name}", daemon=True)
        with self._lock:
            self._in_flight.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._in_flight.discard(thread)
            raise
        return future

    def _probe_http(
        self,
        url: str,
        round_deadline: float,
        grade: Callable[[int, bytes], Grade],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ProbeResult:
        started = time.monotonic()
        try:
            with self._session.get(
                url,
                headers=dict(headers or {}),
                timeout=self._probe_timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                body = _read_capped(response, round_deadline)
                status_code = response.status_code
        except requests.Timeout:
            return ProbeResult("down", reason="timed out")
        except requests.exceptions.SSLError:
            return ProbeResult("unknown", reason="TLS handshake failed")  # answered, unverifiable
        except requests.ConnectionError as exc:
            if _is_name_resolution_failure(exc):
                return ProbeResult("unknown", reason="host does not resolve")  # could not probe
            return ProbeResult("down", reason="connection failed")  # refused, reset, unreachable
        except requests.RequestException as exc:
            return ProbeResult("unknown", reason=f"no usable answer ({type(exc).__name__})")
        elapsed = _elapsed_ms(started)
        if status_code >= 500:
            return ProbeResult("down", response_ms=elapsed, reason=f"answered HTTP {status_code}")
        status, version, note = grade(status_code, body)
        if status in _UP_STATUSES:
            status = self._grade_speed(elapsed)
        return ProbeResult(status, version, elapsed, reason=f"{note}, {elapsed} ms")

    def _probe_tcp(self, host: str, port: int) -> ProbeResult:
        started = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=self._probe_timeout[0]):
                pass
        except socket.gaierror:
            return ProbeResult("unknown", reason="host does not resolve")  # could not probe
        except TimeoutError:
            return ProbeResult("down", reason="connect timed out")
        except OSError as exc:
            return ProbeResult("down", reason=exc.strerror or "connect failed")  # refused etc.
        elapsed = _elapsed_ms(started)
        status = self._grade_speed(elapsed)
        return ProbeResult(status, None, elapsed, reason=f"accepts connections, {elapsed} ms")

    def _grade_speed(self, elapsed_ms: int) -> str:
        return "degraded" if elapsed_ms > self._kit.health_probe_degraded_ms else "healthy"

    def _note_round_failure(self, why: str) -> None:
        level = logging.DEBUG if self._round_failing else logging.WARNING
        log.log(level, "health round %s; heartbeats go without a snapshot", why)
        self._round_failing = True

    def _note_statuses(self, results: Mapping[str, ProbeResult]) -> None:
        if self._round_failing:
            log.info("health rounds complete again")
            self._round_failing = False
        for name, result in results.items():
            previous = self._last_statuses.get(name)
            if result.status == previous:
                continue
            self._last_statuses[name] = result.status
            if result.status == "healthy":
                level = logging.DEBUG if previous is None else logging.INFO
            else:
                level = logging.WARNING
            log.log(level, "health: %s is %s (%s)", name, result.status, result.reason)


def _grade_health_endpoint(status_code: int, body: bytes) -> Grade:
    if 200 <= status_code < 300:
        return "healthy", _version_from(body), "answered"
    # A redirect or a 4xx is an answer, but not a health report: inconclusive.
    return "unknown", None, f"answered HTTP {status_code}, not a health report"


def _grade_xnat(status_code: int, body: bytes) -> Grade:
    if 200 <= status_code < 300 or status_code in (401, 403):
        # Refusing an anonymous caller proves XNAT is up.
        return "healthy", _version_from(body), f"answered HTTP {status_code}"
    return "unknown", None, f"answered HTTP {status_code}, not build info"


def _grade_ping_pacs(status_code: int, body: bytes) -> Grade:
    if not 200 <= status_code < 300:
        return "unknown", None, f"ping_pacs answered HTTP {status_code}"
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    successful = answer.get("successful") if isinstance(answer, dict) else None
    if not isinstance(successful, bool):
        # The verdict is in the JSON body; without it we cannot tell.
        return "unknown", None, "ping_pacs gave no JSON verdict"
    if not successful:
        return "down", None, "imaging-api cannot reach the PACS"
    return "healthy", None, "PACS reachable"


def _read_capped(response: requests.Response, round_deadline: float) -> bytes:
    """Read at most _BODY_LIMIT bytes; a body still dripping at the deadline is a timeout."""
    try:
        return read_body(response, _BODY_LIMIT, round_deadline)[:_BODY_LIMIT]
    except BodyDeadline:
        raise requests.ReadTimeout("body still arriving at the round deadline") from None


def _version_from(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _usable_version(answer.get("version")) if isinstance(answer, dict) else None


def _usable_version(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_VERSION_CHARS:
        return value
    return None


def _elapsed_ms(started: float) -> int:
    return min(max(round((time.monotonic() - started) * 1000), 0), MAX_RESPONSE_MS)


def _is_name_resolution_failure(exc: BaseException) -> bool:
    """True when the host did not resolve (a gaierror somewhere in requests' wrapping)."""
    pending: list[object] = [exc]
    for _ in range(16):  # the chain is short; the bound only guards against cycles
        if not pending:
            break
        current = pending.pop()
        if isinstance(current, socket.gaierror):
            return True
        if isinstance(current, BaseException):
            pending.extend(current.args)
            pending.extend(x for x in (current.__cause__, current.__context__) if x is not None)
            pending.append(getattr(current, "reason", None))
    return False
