"""The health snapshot, probed against real loopback servers and sockets."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from trust_poller import __version__
from trust_poller.health import HealthCollector
from trust_poller.kit import Kit
from trust_poller.playground.kits import kit_in_memory

SERVICE_NAME = re.compile(r"^[a-z0-9-]{1,32}$")
STATUSES = {"healthy", "degraded", "down", "unknown"}
EXPECTED_SERVICES = {"trust-api", "imaging-api", "data-access-api", "xnat", "dicom", "omop"}


def assert_hub_accepts(snapshot: Any) -> None:
    """Mirror of the hub's schema for the heartbeat body: anything else is a 422."""
    assert isinstance(snapshot, dict)
    assert set(snapshot) == {"services", "collected_at"}
    services = snapshot["services"]
    assert isinstance(services, dict)
    assert 1 <= len(services) <= 16
    for name, service in services.items():
        assert isinstance(name, str)
        assert SERVICE_NAME.match(name), name
        assert isinstance(service, dict)
        assert set(service) == {"status", "version", "response_ms"}
        assert service["status"] in STATUSES
        version = service["version"]
        assert version is None or (isinstance(version, str) and len(version) <= 64)
        response_ms = service["response_ms"]
        assert response_ms is None or (type(response_ms) is int and 0 <= response_ms <= 1_000_000)
    collected_at = snapshot["collected_at"]
    assert isinstance(collected_at, str)
    parsed = datetime.fromisoformat(collected_at)
    assert parsed.utcoffset() == timedelta(0)
    assert json.loads(json.dumps(snapshot)) == snapshot


@dataclass
class Route:
    status: int = 200
    body: bytes = b"{}"
    delay: float = 0.0
    location: str | None = None
    headers: list[dict[str, str]] = field(default_factory=list)


class FakeServices(ThreadingHTTPServer):
    """imaging-api, data-access-api and XNAT on one loopback port, each path scriptable."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {
            "/health": Route(body=b'{"status": "ok", "version": "2.3.4"}'),
            "/xapi/siteConfig/buildInfo": Route(body=b'{"version": "1.8.10"}'),
            "/imaging/ping_pacs": Route(body=b'{"successful": true}'),
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeServices

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        route.headers.append(dict(self.headers))
        time.sleep(route.delay)
        self.send_response(route.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(route.body)))
        if route.location is not None:
            self.send_header("Location", route.location)
        self.end_headers()
        self.wfile.write(route.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def services() -> Iterator[FakeServices]:
    server = FakeServices()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def omop_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_kit(services: FakeServices, omop_port: int, **overrides: Any) -> Kit:
    kit = kit_in_memory(
        hub_url="http://127.0.0.1:1/api",
        api_key="k" * 43,
        internal_service_key="internal-key",
        imaging_api_url=services.url,
        data_access_api_url=services.url,
        xnat_url=services.url,
        omop_db_host="127.0.0.1",
        omop_db_port=omop_port,
        health_probe_degraded_ms=1000,
    )
    return replace(kit, **overrides)


@pytest.fixture
def collector_for() -> Iterator[Any]:
    made: list[HealthCollector] = []

    def build(kit: Kit, **options: Any) -> HealthCollector:
        collector = HealthCollector(kit, **options)
        made.append(collector)
        return collector

    yield build
    for collector in made:
        collector.close()


def statuses(snapshot: dict[str, Any] | None) -> dict[str, str]:
    assert snapshot is not None
    return {name: service["status"] for name, service in snapshot["services"].items()}


def test_every_service_healthy_when_all_answer(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert_hub_accepts(snapshot)
    assert statuses(snapshot) == dict.fromkeys(EXPECTED_SERVICES, "healthy")
    found = snapshot["services"]
    assert found["trust-api"] == {"status": "healthy", "version": __version__, "response_ms": 0}
    assert found["imaging-api"]["version"] == "2.3.4"
    assert found["data-access-api"]["version"] == "2.3.4"
    assert found["xnat"]["version"] == "1.8.10"
    assert found["dicom"]["version"] is None
    assert found["omop"]["version"] is None
    assert all(isinstance(service["response_ms"], int) for service in found.values())


def test_internal_key_goes_only_to_ping_pacs(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    collector_for(make_kit(services, omop_port)).collect_round()

    (ping,) = services.routes["/imaging/ping_pacs"].headers
    assert ping["X-Trust-Internal-Service-Key"] == "internal-key"
    for path in ("/health", "/xapi/siteConfig/buildInfo"):
        for headers in services.routes[path].headers:
            assert "internal-key" not in headers.values()


def test_slow_success_is_degraded(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    services.routes["/xapi/siteConfig/buildInfo"].delay = 0.15
    kit = make_kit(services, omop_port, health_probe_degraded_ms=50)

    snapshot = collector_for(kit).collect_round()

    assert snapshot is not None
    assert snapshot["services"]["xnat"]["status"] == "degraded"
    assert snapshot["services"]["xnat"]["response_ms"] >= 150
    assert snapshot["services"]["omop"]["status"] == "healthy"


def test_pacs_unreachable_makes_dicom_down(
    services: FakeServices, omop_port: int, collector_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    services.routes["/imaging/ping_pacs"].body = b'{"successful": false}'
    caplog.set_level("DEBUG", logger="trust_poller.health")

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert statuses(snapshot)["dicom"] == "down"
    assert statuses(snapshot)["imaging-api"] == "healthy"
    assert "dicom is down" in caplog.text
    assert "internal-key" not in caplog.text


@pytest.mark.parametrize("body", [b"<html>PACS ok</html>", b'{"status": "fine"}', b"[true]"])
def test_ping_pacs_without_a_verdict_is_unknown(
    services: FakeServices, omop_port: int, collector_for: Any, body: bytes
) -> None:
    services.routes["/imaging/ping_pacs"].body = body

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert statuses(snapshot)["dicom"] == "unknown"


@pytest.mark.parametrize("status", [401, 403])
def test_xnat_refusing_anonymous_callers_counts_as_up(
    services: FakeServices, omop_port: int, collector_for: Any, status: int
) -> None:
    services.routes["/xapi/siteConfig/buildInfo"] = Route(status=status, body=b"<html>login</html>")

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert snapshot is not None
    assert snapshot["services"]["xnat"]["status"] == "healthy"
    assert snapshot["services"]["xnat"]["version"] is None


def test_server_error_is_down_with_its_response_time(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    services.routes["/health"] = Route(status=503, body=b'{"version": "2.3.4"}')

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert snapshot is not None
    imaging = snapshot["services"]["imaging-api"]
    assert imaging["status"] == "down"
    assert isinstance(imaging["response_ms"], int)
    assert statuses(snapshot)["data-access-api"] == "down"


@pytest.mark.parametrize("status", [302, 404])
def test_health_endpoint_answering_otherwise_is_unknown(
    services: FakeServices, omop_port: int, collector_for: Any, status: int
) -> None:
    # Following this redirect would land on a healthy-looking page.
    services.routes["/health"] = Route(status=status, location="/xapi/siteConfig/buildInfo")

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert statuses(snapshot)["imaging-api"] == "unknown"
    assert statuses(snapshot)["data-access-api"] == "unknown"
    assert len(services.routes["/xapi/siteConfig/buildInfo"].headers) == 1  # xnat's own probe


@pytest.mark.parametrize("version", ["v" * 65, 7, "", None])
def test_unusable_version_is_dropped(
    services: FakeServices, omop_port: int, collector_for: Any, version: object
) -> None:
    services.routes["/health"].body = json.dumps({"version": version}).encode()

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert_hub_accepts(snapshot)
    assert snapshot["services"]["imaging-api"] == {
        "status": "healthy",
        "version": None,
        "response_ms": snapshot["services"]["imaging-api"]["response_ms"],
    }


def test_refused_connections_are_down(
    services: FakeServices, refused_port: int, collector_for: Any
) -> None:
    closed = f"http://127.0.0.1:{refused_port}"
    kit = make_kit(services, refused_port, xnat_url=closed, data_access_api_url=closed)

    snapshot = collector_for(kit).collect_round()

    assert_hub_accepts(snapshot)
    for name in ("xnat", "data-access-api", "omop"):
        assert snapshot["services"][name] == {
            "status": "down",
            "version": None,
            "response_ms": None,
        }
    assert snapshot["services"]["imaging-api"]["status"] == "healthy"


def test_unresolvable_hosts_are_unknown(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    kit = make_kit(
        services, omop_port, omop_db_host="omop-db.invalid", xnat_url="http://xnat-web.invalid:1"
    )

    snapshot = collector_for(kit).collect_round()

    assert snapshot is not None
    for name in ("omop", "xnat"):
        assert snapshot["services"][name] == {
            "status": "unknown",
            "version": None,
            "response_ms": None,
        }


def test_read_timeout_is_down(services: FakeServices, omop_port: int, collector_for: Any) -> None:
    services.routes["/imaging/ping_pacs"].delay = 0.4

    collector = collector_for(make_kit(services, omop_port), probe_timeout=(1.0, 0.1))
    snapshot = collector.collect_round()

    assert snapshot is not None
    assert snapshot["services"]["dicom"] == {"status": "down", "version": None, "response_ms": None}


def test_proxy_settings_in_the_environment_are_ignored(
    services: FakeServices, omop_port: int, collector_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    snapshot = collector_for(make_kit(services, omop_port)).collect_round()

    assert statuses(snapshot)["imaging-api"] == "healthy"


def test_round_past_its_deadline_sends_nothing_and_forgets_the_last_snapshot(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    collector = collector_for(make_kit(services, omop_port), deadline=0.2)
    assert collector.collect_round() is not None
    assert collector.latest() is not None

    services.routes["/health"].delay = 0.5
    started = time.monotonic()
    assert collector.collect_round() is None

    assert time.monotonic() - started < 0.45
    assert collector.latest() is None


def test_latest_is_none_once_the_snapshot_is_stale(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    now = [1000.0]
    kit = make_kit(services, omop_port, health_collect_interval=30.0)
    collector = collector_for(kit, clock=lambda: now[0], deadline=5.0)
    assert collector.latest() is None

    snapshot = collector.collect_round()

    now[0] += 35.0
    assert collector.latest() == snapshot
    now[0] += 0.5
    assert collector.latest() is None


def test_latest_returns_a_copy(services: FakeServices, omop_port: int, collector_for: Any) -> None:
    collector = collector_for(make_kit(services, omop_port))
    collector.collect_round()

    first = collector.latest()
    assert first is not None
    first["services"].clear()

    assert len(statuses(collector.latest())) == len(EXPECTED_SERVICES)


def test_run_refreshes_then_stops_promptly_when_told(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    kit = make_kit(services, omop_port, health_collect_interval=30.0)
    collector = collector_for(kit)
    stop = threading.Event()
    runner = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    runner.start()
    give_up = time.monotonic() + 3.0
    while collector.latest() is None and time.monotonic() < give_up:
        time.sleep(0.01)
    assert collector.latest() is not None

    stop.set()
    runner.join(timeout=1.0)

    assert not runner.is_alive()


def test_run_stops_promptly_mid_round(
    services: FakeServices, omop_port: int, collector_for: Any
) -> None:
    services.routes["/health"].delay = 0.5
    collector = collector_for(make_kit(services, omop_port))
    stop = threading.Event()
    runner = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    runner.start()
    time.sleep(0.05)
    asked_at = time.monotonic()
    assert collector.latest() is None  # a heartbeat never waits for the round in progress
    assert time.monotonic() - asked_at < 0.05

    stopped_at = time.monotonic()
    stop.set()
    runner.join(timeout=1.0)

    assert not runner.is_alive()
    assert time.monotonic() - stopped_at < 0.3
    assert collector.latest() is None
