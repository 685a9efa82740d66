"""The trust-internal client: bounded in time and bytes, no proxies/redirects, safe error texts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from trust_poller.kit import Kit
from trust_poller.playground.kits import CANARY_HUB_KEY, CANARY_INTERNAL_KEY, kit_in_memory
from trust_poller.services import ServiceClient, ServiceError

INTERNAL_KEY = CANARY_INTERNAL_KEY
HUB_KEY = CANARY_HUB_KEY
AES_KEY = bytes(range(32))
IMAGING = "http://imaging.test"


@pytest.fixture
def kit() -> Kit:
    return kit_in_memory(
        aes_key=AES_KEY,
        api_key=HUB_KEY,
        internal_service_key=INTERNAL_KEY,
        data_access_api_url="http://data-access.test",
        imaging_api_url=IMAGING,
    )


@pytest.fixture
def client(kit: Kit) -> Iterator[ServiceClient]:
    with ServiceClient(kit) as service_client:
        yield service_client


def _raises(client: ServiceClient, method: str = "GET", url: str = f"{IMAGING}/x") -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        client.call(method, url)
    return caught.value


def test_call_sends_internal_key_and_bounded_timeout_and_streams(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{IMAGING}/projects",
            json={"ID": "p1"},
            match=[
                matchers.header_matcher({"X-Trust-Internal-Service-Key": INTERNAL_KEY}),
                matchers.json_params_matcher({"a": 1}),
                matchers.request_kwargs_matcher({"timeout": (3.05, 30.0), "stream": True}),
            ],
        )
        reply = client.call("POST", f"{IMAGING}/projects", json={"a": 1})
        sent = rsps.calls[0].request.headers
    assert reply.status == 200
    assert reply.json() == {"ID": "p1"}
    assert "Authorization" not in sent
    assert HUB_KEY not in str(dict(sent))


def test_read_timeout_override_and_extra_headers(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/slow",
            json={},
            match=[
                matchers.header_matcher(
                    {"X-Extra": "1", "X-Trust-Internal-Service-Key": INTERNAL_KEY}
                ),
                matchers.query_param_matcher({"encoded_query": "a b&c"}),
                matchers.request_kwargs_matcher({"timeout": (3.05, 300.0)}),
            ],
        )
        client.call(
            "GET",
            f"{IMAGING}/slow",
            params={"encoded_query": "a b&c"},
            headers={"X-Extra": "1"},
            read_timeout=300.0,
        )


def test_caller_headers_cannot_replace_the_internal_key(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/x",
            match=[matchers.header_matcher({"X-Trust-Internal-Service-Key": INTERNAL_KEY})],
        )
        client.call("GET", f"{IMAGING}/x", headers={"X-Trust-Internal-Service-Key": "other"})


def test_environment_proxies_ca_bundle_and_netrc_are_ignored(
    client: ServiceClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine imaging.test login someone password netrc-canary\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("ALL_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/x",
            match=[matchers.request_kwargs_matcher({"proxies": {}, "verify": True})],
        )
        client.call("GET", f"{IMAGING}/x")
        assert "Authorization" not in rsps.calls[0].request.headers


def test_cookies_do_not_carry_over_between_calls(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/a", headers={"Set-Cookie": "session=abc; Path=/"})
        rsps.get(f"{IMAGING}/b")
        client.call("GET", f"{IMAGING}/a")
        client.call("GET", f"{IMAGING}/b")
        assert "Cookie" not in rsps.calls[1].request.headers


def test_redirect_is_not_followed_and_fails_naming_the_status(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/x",
            status=302,
            headers={"Location": "http://user:pw@elsewhere.test/x"},
        )
        error = _raises(client)
        assert len(rsps.calls) == 1
    assert error.status_code == 302
    assert "302" in error.reason
    assert "redirect" in error.reason
    assert "elsewhere" not in error.reason


def test_error_status_uses_json_detail(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", status=404, json={"detail": "Project not found"})
        error = _raises(client)
    assert error.reason == "imaging-api answered 404: Project not found"
    assert (error.status_code, error.detail, error.timed_out) == (404, "Project not found", False)


def test_non_string_json_detail_is_str_ed(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", status=422, json={"detail": [{"loc": ["body"], "msg": "bad"}]})
        error = _raises(client)
    assert error.detail == "[{'loc': ['body'], 'msg': 'bad'}]"


def test_html_error_body_becomes_a_short_collapsed_excerpt(client: ServiceClient) -> None:
    page = (
        "<html>\n<head><title>502   Bad Gateway</title><style>body{color:red}</style></head>\n"
        "<body>\n<h1>Bad\n\n Gateway</h1>" + "<p>filler text</p>" * 200 + "</body></html>"
    )
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", status=502, body=page, content_type="text/html")
        error = _raises(client)
    assert error.status_code == 502
    assert error.detail is not None
    assert error.detail.startswith("502 Bad Gateway Bad Gateway filler text")
    assert "<" not in error.detail
    assert "color" not in error.detail
    assert len(error.detail) <= 300
    assert "  " not in error.detail


def test_empty_error_body_falls_back_to_the_reason_phrase(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", status=503, body=b"")
        error = _raises(client)
    assert error.reason == "imaging-api answered 503: Service Unavailable"


def test_upstream_echo_of_the_internal_key_is_scrubbed(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/x",
            status=500,
            json={"detail": f"bad header X-Trust-Internal-Service-Key: {INTERNAL_KEY}"},
        )
        error = _raises(client)
    assert INTERNAL_KEY not in error.reason
    assert "[REDACTED]" in error.reason


def test_non_json_success_body_fails_clearly_without_status(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", body="<html>login</html>", content_type="text/html")
        reply = client.call("GET", f"{IMAGING}/x")
    with pytest.raises(ServiceError) as caught:
        reply.json()
    assert caught.value.reason == (
        "imaging-api answered 200 with a body that is not JSON, JSON was expected"
    )
    assert caught.value.status_code is None


def test_timeouts_and_transport_errors_from_requests(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/read", body=requests.exceptions.ReadTimeout("read timed out"))
        rsps.get(f"{IMAGING}/connect", body=requests.exceptions.ConnectTimeout("timed out"))
        rsps.get(
            f"{IMAGING}/dns",
            body=requests.ConnectionError(
                "Failed to resolve 'imaging.test' ([Errno -2] Name or service not known)"
            ),
        )
        rsps.get(f"{IMAGING}/bad", body=requests.exceptions.InvalidHeader("bad"))
        read = _raises(client, url=f"{IMAGING}/read")
        connect = _raises(client, url=f"{IMAGING}/connect")
        dns = _raises(client, url=f"{IMAGING}/dns")
        other = _raises(client, url=f"{IMAGING}/bad")
    assert (read.reason, read.timed_out, read.status_code) == (
        "imaging-api did not answer within 30 s",
        True,
        None,
    )
    assert (connect.reason, connect.timed_out) == (
        "imaging-api unreachable: no connection within 3.05 s",
        False,
    )
    assert dns.reason == "imaging-api unreachable: host name does not resolve"
    assert other.reason == "imaging-api call failed: InvalidHeader"


def test_body_over_the_cap_fails_while_streaming(kit: Kit) -> None:
    with ServiceClient(kit, max_bytes=100_000) as small, responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", body=b"x" * 100_001)
        error = _raises(small)
    assert error.reason == "imaging-api response too large (over 100,000 bytes)"
    assert error.status_code is None


def test_declared_length_over_the_default_cap_fails_before_reading(client: ServiceClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", body=b"{}", headers={"Content-Length": "10000001"})
        error = _raises(client)
    assert error.reason == "imaging-api response too large (over 10,000,000 bytes)"


def test_body_exactly_at_the_cap_is_accepted(kit: Kit) -> None:
    with ServiceClient(kit, max_bytes=1000) as small, responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/x", body=b"y" * 1000)
        assert len(small.call("GET", f"{IMAGING}/x").body) == 1000


def test_wall_clock_deadline_stops_a_slow_body(kit: Kit) -> None:
    ticks = iter([0.0, 10.0, 1000.0, 2000.0, 3000.0, 4000.0])
    with (
        ServiceClient(kit, deadline_margin=5.0, clock=lambda: next(ticks)) as slow,
        responses.RequestsMock() as rsps,
    ):
        rsps.get(f"{IMAGING}/x", body=b"z" * 300_000)
        error = _raises(slow)
    assert error.reason == "imaging-api did not finish its answer within 35 s"
    assert error.timed_out


def test_close_closes_the_session(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[requests.Session] = []

    def record_close(session: requests.Session) -> None:
        closed.append(session)

    monkeypatch.setattr(requests.Session, "close", record_close)
    with ServiceClient(kit):
        assert closed == []
    assert len(closed) == 1


# --- against real loopback sockets (what the mocks above stand in for) ---


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, list[bytes]]]:
    """A one-shot server: replies with the queued raw bytes (None = never answer), then closes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    replies: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            if replies:
                connection.sendall(replies[0])
            else:
                stop.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], replies
    stop.set()
    server.close()


def test_connection_refused_on_loopback(kit: Kit) -> None:
    with ServiceClient(kit) as service_client:
        error = _raises(service_client, url=f"http://127.0.0.1:{_free_port()}/x")
    assert error.reason == "imaging-api unreachable: connection refused"
    assert error.status_code is None
    assert not error.timed_out


def test_read_timeout_on_a_silent_loopback_server(
    kit: Kit, loopback_server: tuple[int, list[bytes]]
) -> None:
    port, _ = loopback_server
    with ServiceClient(kit) as service_client, pytest.raises(ServiceError) as caught:
        service_client.call("POST", f"http://127.0.0.1:{port}/cohort", json={}, read_timeout=0.2)
    assert caught.value.reason == "imaging-api did not answer within 0.2 s"
    assert caught.value.timed_out


def test_body_cut_short_on_loopback(kit: Kit, loopback_server: tuple[int, list[bytes]]) -> None:
    port, replies = loopback_server
    replies.append(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial":')
    with ServiceClient(kit) as service_client:
        error = _raises(service_client, url=f"http://127.0.0.1:{port}/x")
    assert error.reason == (
        "imaging-api answer was cut off: connection closed before the whole answer arrived"
    )
    assert error.status_code is None


def test_a_body_dripping_past_the_deadline_fails_at_the_deadline(kit: Kit) -> None:
    """A byte every 0.05 s never trips the read timeout; the wall-clock deadline must."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def drip() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not stop.wait(0.05):
                connection.sendall(b" ")

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/x"
    started = time.monotonic()
    try:
        with (
            ServiceClient(kit, deadline_margin=0.5) as service_client,
            pytest.raises(ServiceError) as caught,
        ):
            service_client.call("GET", url, read_timeout=0.5)
    finally:
        stop.set()
        server.close()
    assert time.monotonic() - started < 3
    assert caught.value.timed_out
    assert "did not finish its answer within 1 s" in caught.value.reason
