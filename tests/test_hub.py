"""The hub client: exact wire contract, what each reply means, and bounded, safe transport."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
import responses
from responses import matchers

from trust_poller.hub import (
    SMALL_REPLY_CAP,
    Answer,
    Halted,
    HeartbeatReply,
    HubClient,
    HubError,
    HubKeyRejected,
    HubRateLimited,
    Identity,
    SnapshotRejected,
    system_trust_store,
)
from trust_poller.kit import Kit
from trust_poller.pacing import Pacer
from trust_poller.playground.fake_clock import ClockHalt, FakeClock
from trust_poller.playground.kits import CANARY_HUB_KEY, CANARY_INTERNAL_KEY, kit_in_memory
from trust_poller.tls import PinnedTrustAdapter

HUB = "https://hub.test/api"
HUB_KEY = CANARY_HUB_KEY
INTERNAL_KEY = CANARY_INTERNAL_KEY
TRUST_ID = "6f1c2b4e-8a9d-4c3b-9e7f-0a1b2c3d4e5f"
TRUST_NAME = "Trust_1"
TASK_ID = "0b6c7f38-1d2e-4f5a-8b9c-0d1e2f3a4b5c"
IDENTITY_BODY = {"trust_id": TRUST_ID, "trust_name": TRUST_NAME}
HEARTBEAT_BODY = {
    **IDENTITY_BODY,
    "message": "Heartbeat recorded",
    "hub_version": "1.4.2",
    "aes_key_fingerprint": "ABCDEF012345",
}
HTML_PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host sets REQUESTS_CA_BUNDLE; it and any proxy must not leak into the tests."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def make_kit(hub_url: str = HUB, header: str = "Authorization") -> Kit:
    return kit_in_memory(
        hub_url=hub_url, api_key=HUB_KEY, api_key_header=header, internal_service_key=INTERNAL_KEY
    )


class Seen:
    """Records the identities a client reports."""

    def __init__(self) -> None:
        self.identities: list[Identity] = []

    def __call__(self, identity: Identity) -> None:
        self.identities.append(identity)


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def client(seen: Seen) -> Iterator[HubClient]:
    hub_client = HubClient(make_kit(), threading.Event(), on_identity=seen)
    yield hub_client
    hub_client.close()


def _error(status: int, detail: str) -> dict[str, Any]:
    return {"method": "POST", "status": status, "json": {"detail": detail}}


# --- the request: paths, auth header, bodies, transport settings ---------------------------


def test_heartbeat_posts_to_trust_heartbeat_with_raw_key_and_bounded_transport(
    client: HubClient,
) -> None:
    with responses.RequestsMock() as rsps:
        call = rsps.post(
            f"{HUB}/trust/heartbeat",
            json=HEARTBEAT_BODY,
            match=[
                matchers.header_matcher({"Authorization": HUB_KEY}),
                matchers.request_kwargs_matcher(
                    {"timeout": (3.05, 27.0), "verify": system_trust_store(), "stream": True}
                ),
            ],
        )
        client.heartbeat(None)
    assert call.call_count == 1
    assert call.calls[0].request.body is None


def test_every_endpoint_uses_its_exact_path_and_method(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        heartbeat = rsps.post(f"{HUB}/trust/heartbeat", json=HEARTBEAT_BODY)
        pending = rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": []})
        result = rsps.post(f"{HUB}/tasks/{TASK_ID}/result", json=IDENTITY_BODY)
        cohort = rsps.post(f"{HUB}/cohort/results", json={"message": "ok"})
        client.heartbeat(None)
        client.pending_tasks(None)
        client.report_result(None, TASK_ID, {"success": True, "result": None})
        client.post_cohort_results({"query_id": "q"})
        urls = [(c.request.method, c.request.url) for c in rsps.calls]
    assert [r.call_count for r in (heartbeat, pending, result, cohort)] == [1, 1, 1, 1]
    assert urls == [
        ("POST", f"{HUB}/trust/heartbeat"),
        ("GET", f"{HUB}/tasks/pending"),
        ("POST", f"{HUB}/tasks/{TASK_ID}/result"),
        ("POST", f"{HUB}/cohort/results"),
    ]


@pytest.mark.parametrize("header", ["Authorization", "X-Trust-API-Key"])
def test_exactly_one_header_carries_the_raw_key(header: str) -> None:
    hub_client = HubClient(make_kit(header=header), threading.Event())
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", json=HEARTBEAT_BODY)
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": []})
        rsps.post(f"{HUB}/tasks/{TASK_ID}/result", json=IDENTITY_BODY)
        rsps.post(f"{HUB}/cohort/results", json={"message": "ok"})
        hub_client.heartbeat(None)
        hub_client.pending_tasks(None)
        hub_client.report_result(None, TASK_ID, {"success": True, "result": None})
        hub_client.post_cohort_results({"query_id": "q"})
        calls = list(rsps.calls)
    hub_client.close()
    assert len(calls) == 4
    for call in calls:
        headers = call.request.headers
        carrying = [name for name, value in headers.items() if HUB_KEY in value]
        assert carrying == [header]
        assert headers[header] == HUB_KEY
        assert INTERNAL_KEY not in json.dumps(dict(headers))
        if header != "Authorization":
            assert "Authorization" not in headers


def test_result_body_is_sent_exactly_as_given(client: HubClient) -> None:
    body = {"success": False, "result": json.dumps({"error": "boom", "status_code": 404})}
    with responses.RequestsMock() as rsps:
        call = rsps.post(
            f"{HUB}/tasks/{TASK_ID}/result",
            json=IDENTITY_BODY,
            match=[
                matchers.json_params_matcher(body),
                matchers.request_kwargs_matcher(
                    {"timeout": (3.05, 27.0), "verify": system_trust_store(), "stream": True}
                ),
            ],
        )
        client.report_result(None, TASK_ID, body)
    assert json.loads(call.calls[0].request.body or b"") == body
    assert set(json.loads(call.calls[0].request.body or b"")) == {"success", "result"}


def test_heartbeat_sends_the_snapshot_as_its_body(client: HubClient) -> None:
    snapshot = {"services": {"trust-api": {"status": "healthy"}}, "collected_at": None}
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            json=HEARTBEAT_BODY,
            match=[matchers.json_params_matcher(snapshot)],
        )
        client.heartbeat(None, snapshot)


def test_hub_ca_bundle_is_passed_as_verify_on_every_request(tmp_path: Path) -> None:
    bundle = tmp_path / "hub-ca.pem"
    bundle.write_text(Path(requests.utils.DEFAULT_CA_BUNDLE_PATH).read_text())
    hub_client = HubClient(replace(make_kit(), hub_ca_bundle=bundle), threading.Event())
    with responses.RequestsMock() as rsps:
        kwargs = matchers.request_kwargs_matcher({"verify": str(bundle)})
        rsps.post(f"{HUB}/trust/heartbeat", json=HEARTBEAT_BODY, match=[kwargs])
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": []}, match=[kwargs])
        hub_client.heartbeat(None)
        hub_client.pending_tasks(None)
    hub_client.close()


def test_requests_ca_bundle_variable_does_not_replace_verify(
    client: HubClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "elsewhere.pem"))
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            json=HEARTBEAT_BODY,
            match=[matchers.request_kwargs_matcher({"verify": system_trust_store()})],
        )
        client.heartbeat(None)


def test_redirect_is_not_followed_and_is_not_an_answer(client: HubClient) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            status=302,
            headers={"Location": "https://elsewhere.test/api/trust/heartbeat"},
        )
        elsewhere = rsps.post("https://elsewhere.test/api/trust/heartbeat", json=HEARTBEAT_BODY)
        with pytest.raises(HubError):
            client.heartbeat(None)
        assert len(rsps.calls) == 1
    assert elsewhere.call_count == 0


def test_halted_pacer_sends_nothing(client: HubClient) -> None:
    client.halt.set()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", json=HEARTBEAT_BODY)
        with pytest.raises(Halted):
            client.heartbeat(Pacer("heartbeat", 30))
        assert len(rsps.calls) == 0


# --- proxies and ~/.netrc --------------------------------------------------------------------


def test_proxy_from_environment_at_construction_is_used_and_env_is_not_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.test:3128")
    hub_client = HubClient(make_kit(), threading.Event())
    assert hub_client.proxies.get("https") == "http://proxy.hospital.test:3128"
    assert hub_client.session.trust_env is False
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            json=HEARTBEAT_BODY,
            match=[matchers.request_kwargs_matcher({"proxies": hub_client.proxies})],
        )
        hub_client.heartbeat(None)
    hub_client.close()


def test_no_proxy_naming_the_hub_means_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.test:3128")
    monkeypatch.setenv("NO_PROXY", "hub.test")
    hub_client = HubClient(make_kit(), threading.Event())
    assert "https" not in hub_client.proxies
    hub_client.close()


# --- heartbeat replies -------------------------------------------------------------------------


def test_heartbeat_reply_carries_identity_version_and_lowercased_fingerprint(
    client: HubClient, seen: Seen
) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", json=HEARTBEAT_BODY)
        reply = client.heartbeat(None)
    assert reply == HeartbeatReply(Identity(TRUST_ID, TRUST_NAME), "1.4.2", "abcdef012345")
    assert seen.identities == [Identity(TRUST_ID, TRUST_NAME)]


def test_older_hub_without_version_or_fingerprint_gives_none(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", json={**IDENTITY_BODY, "message": "ok"})
        rsps.post(
            f"{HUB}/trust/heartbeat",
            json={**IDENTITY_BODY, "hub_version": None, "aes_key_fingerprint": 12345},
        )
        first = client.heartbeat(None)
        second = client.heartbeat(None)
    assert (first.hub_version, first.hub_key_fingerprint) == (None, None)
    assert (second.hub_version, second.hub_key_fingerprint) == (None, None)


def test_heartbeat_200_without_identity_is_not_a_success(client: HubClient, seen: Seen) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", json={"message": "Heartbeat recorded"})
        with pytest.raises(HubError, match="trust_id"):
            client.heartbeat(None)
    assert seen.identities == []


def test_heartbeat_422_with_snapshot_is_snapshot_rejected(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", status=422, json={"detail": "bad services"})
        with pytest.raises(SnapshotRejected, match="bad services"):
            client.heartbeat(None, {"services": {}, "collected_at": None})


def test_heartbeat_422_without_snapshot_is_a_hub_error(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", status=422, json={"detail": "??"})
        with pytest.raises(HubError) as caught:
            client.heartbeat(None)
    assert not isinstance(caught.value, SnapshotRejected)


def test_401_is_key_rejected_without_revealing_the_key(client: HubClient, seen: Seen) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            status=401,
            json={"detail": "Invalid API key"},
            headers={"WWW-Authenticate": "ApiKey"},
        )
        with pytest.raises(HubKeyRejected) as caught:
            client.heartbeat(None)
    assert HUB_KEY not in str(caught.value)
    assert HUB_KEY not in repr(caught.value)
    assert "TRUST_API_KEY" in str(caught.value)
    assert seen.identities == []


def test_429_is_rate_limited_with_retry_after_and_defers_the_pacer(client: HubClient) -> None:
    clock = FakeClock()
    pacer = Pacer("heartbeat", 30, clock)
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            status=429,
            json={"detail": "Rate limit exceeded"},
            headers={"Retry-After": "7"},
        )
        with pytest.raises(HubRateLimited) as caught:
            client.heartbeat(pacer)
    assert caught.value.retry_after == 7.0
    assert caught.value.status == 429
    halt = ClockHalt(clock)
    assert pacer.acquire(halt)
    assert sum(halt.waits) == pytest.approx(7.0)


def test_429_without_retry_after_waits_a_minute(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", status=429, body="Too Many Requests")
        with pytest.raises(HubRateLimited) as caught:
            client.pending_tasks(None)
    assert caught.value.retry_after == 60.0


@pytest.mark.parametrize("status", [500, 503])
def test_hub_5xx_json_is_a_hub_error(client: HubClient, status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", status=status, json={"detail": "Internal error"})
        with pytest.raises(HubError) as caught:
            client.heartbeat(None)
    assert caught.value.status == status
    assert not isinstance(caught.value, HubRateLimited)


@pytest.mark.parametrize("status", [502, 403, 404, 407, 413])
def test_proxy_html_page_is_a_hub_error_not_an_answer(client: HubClient, status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", status=status, body=HTML_PAGE, content_type="text/html")
        rsps.post(
            f"{HUB}/tasks/{TASK_ID}/result", status=status, body=HTML_PAGE, content_type="text/html"
        )
        with pytest.raises(HubError, match="not the hub's JSON"):
            client.heartbeat(None)
        with pytest.raises(HubError, match="not the hub's JSON"):
            client.report_result(None, TASK_ID, {"success": True, "result": None})


def test_non_json_200_is_a_hub_error(client: HubClient, seen: Seen) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/trust/heartbeat", status=200, body="OK", content_type="text/plain")
        rsps.post(
            f"{HUB}/trust/heartbeat", status=200, body="{not json", content_type="application/json"
        )
        with pytest.raises(HubError):
            client.heartbeat(None)
        with pytest.raises(HubError):
            client.heartbeat(None)
    assert seen.identities == []


def test_transport_failure_is_a_hub_error(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            body=requests.ConnectionError("[Errno 111] Connection refused"),
        )
        with pytest.raises(HubError, match="connection refused"):
            client.heartbeat(None)


def test_every_failure_reason_names_its_call_exactly_once(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", body=requests.ConnectionError("Connection refused"))
        rsps.get(f"{HUB}/tasks/pending", status=503, json={"detail": "down"})
        reasons = []
        for _ in range(2):
            with pytest.raises(HubError) as failed:
                client.pending_tasks(None)
            reasons.append(failed.value.reason)

    assert reasons == ["poll: connection refused", "poll: hub error 503"]


# --- pending tasks -----------------------------------------------------------------------------


def test_pending_tasks_are_parsed_with_identity(client: HubClient, seen: Seen) -> None:
    item = {
        "id": TASK_ID,
        "task_type": "cohort_query",
        "payload": "ZW52ZWxvcGU=",
        "created_at": "2025-01-01T00:00:00Z",
    }
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": [item]})
        identity, tasks = client.pending_tasks(None)
    assert identity == Identity(TRUST_ID, TRUST_NAME)
    assert seen.identities == [identity]
    assert len(tasks) == 1
    task = tasks[0]
    assert (task.id, task.task_type, task.payload, task.created_at, task.problem) == (
        TASK_ID,
        "cohort_query",
        "ZW52ZWxvcGU=",
        "2025-01-01T00:00:00Z",
        None,
    )


def test_pending_idle_is_an_empty_list(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": []})
        assert client.pending_tasks(None)[1] == []


@pytest.mark.parametrize("tasks", [None, {"id": TASK_ID}, "[]"])
def test_pending_tasks_that_is_not_a_list_is_a_hub_error(client: HubClient, tasks: Any) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": tasks})
        with pytest.raises(HubError, match="tasks"):
            client.pending_tasks(None)


def test_pending_items_are_normalised_deduplicated_and_flagged(
    client: HubClient, caplog: pytest.LogCaptureFixture
) -> None:
    other = "1a2b3c4d-0000-4000-8000-00000000abcd"
    items: list[Any] = [
        {"id": "not-a-uuid", "task_type": "x", "payload": "p"},
        {"task_type": "x", "payload": "p"},
        {"id": 12345, "task_type": "x", "payload": "p"},
        "just a string",
        {"id": TASK_ID.upper(), "task_type": "delete_imaging", "payload": "p1"},
        {"id": TASK_ID, "task_type": "delete_imaging", "payload": "p2"},
        {"id": "{" + other + "}", "payload": "p3"},
        {"id": other.replace("-", ""), "task_type": "ignored-duplicate", "payload": "p4"},
        {"id": "2a2b3c4d-0000-4000-8000-00000000abcd", "task_type": "reimport_studies"},
    ]
    caplog.set_level(logging.WARNING, logger="trust_poller.hub")
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": items})
        _, tasks = client.pending_tasks(None)
    assert [task.id for task in tasks] == [
        TASK_ID,
        other,
        "2a2b3c4d-0000-4000-8000-00000000abcd",
    ]
    assert tasks[0].payload == "p1"
    assert tasks[0].problem is None
    assert tasks[1].task_type == ""
    assert tasks[1].problem == "task has no task_type"
    assert tasks[2].problem == "task has no payload"
    unusable = [r for r in caplog.records if "no usable id" in r.getMessage()]
    assert len(unusable) == 4
    assert any("appears twice" in r.getMessage() for r in caplog.records)


def test_pending_reply_may_be_larger_than_the_small_reply_cap(client: HubClient) -> None:
    large = [{"id": TASK_ID, "task_type": "x", "payload": "A" * (2 * SMALL_REPLY_CAP)}]
    with responses.RequestsMock() as rsps:
        rsps.get(f"{HUB}/tasks/pending", json={**IDENTITY_BODY, "tasks": large})
        _, tasks = client.pending_tasks(None)
    assert len(tasks) == 1


# --- result posts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail", "answer"),
    [
        (409, f"Task {TASK_ID} is not in progress (status: COMPLETED)", Answer.RETIRED),
        (409, f"Task {TASK_ID} is not in progress (status: FAILED)", Answer.RETIRED),
        (409, f"Task {TASK_ID} is not in progress (status: PENDING)", Answer.AWAIT_REDELIVERY),
        (403, "Task belongs to another trust", Answer.RETIRED),
        (404, "Task not found", Answer.RETIRED),
        (422, "result too long", Answer.BODY_REFUSED),
    ],
)
def test_result_refusals_from_the_hub_mean_what_the_protocol_says(
    client: HubClient, seen: Seen, status: int, detail: str, answer: Answer
) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/tasks/{TASK_ID}/result", status=status, json={"detail": detail})
        reply = client.report_result(None, TASK_ID, {"success": True, "result": None})
    assert reply.answer is answer
    assert seen.identities == []


def test_result_200_is_acknowledged_and_reports_identity(client: HubClient, seen: Seen) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/tasks/{TASK_ID}/result",
            json={**IDENTITY_BODY, "message": f"Task {TASK_ID} result recorded"},
        )
        reply = client.report_result(None, TASK_ID, {"success": True, "result": None})
    assert reply.answer is Answer.ACKNOWLEDGED
    assert seen.identities == [Identity(TRUST_ID, TRUST_NAME)]


def test_result_409_without_a_status_is_not_taken_as_final(client: HubClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/tasks/{TASK_ID}/result", status=409, json={"detail": "conflict"})
        with pytest.raises(HubError):
            client.report_result(None, TASK_ID, {"success": True, "result": None})


@pytest.mark.parametrize(
    ("response", "error"),
    [
        ({"status": 401, "json": {"detail": "Invalid API key"}}, HubKeyRejected),
        ({"status": 500, "json": {"detail": "boom"}}, HubError),
        ({"status": 503, "json": {"detail": "busy"}}, HubError),
        ({"status": 429, "json": {"detail": "slow down"}}, HubRateLimited),
        ({"body": requests.ConnectTimeout("timed out")}, HubError),
        ({"body": requests.ReadTimeout("timed out")}, HubError),
    ],
)
def test_result_trouble_raises_instead_of_answering(
    client: HubClient, response: dict[str, Any], error: type[Exception]
) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/tasks/{TASK_ID}/result", **response)
        with pytest.raises(error):
            client.report_result(None, TASK_ID, {"success": True, "result": None})


def test_result_429_defers_the_results_pacer(client: HubClient) -> None:
    clock = FakeClock()
    pacer = Pacer("result", 60, clock)
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/tasks/{TASK_ID}/result",
            status=429,
            json={"detail": "slow"},
            headers={"Retry-After": "12"},
        )
        with pytest.raises(HubRateLimited):
            client.report_result(pacer, TASK_ID, {"success": True, "result": None})
    halt = ClockHalt(clock)
    assert pacer.acquire(halt)
    assert sum(halt.waits) == pytest.approx(12.0)


# --- cohort results ----------------------------------------------------------------------------


def test_cohort_post_200_is_acknowledged_without_identity(client: HubClient, seen: Seen) -> None:
    body = {"query_id": "q", "trust_id": TRUST_ID, "record_count": 0, "data": [], "error": None}
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/cohort/results",
            json={"message": "Cohort results processed successfully"},
            match=[
                matchers.json_params_matcher(body),
                matchers.header_matcher({"Authorization": HUB_KEY}),
                matchers.request_kwargs_matcher({"timeout": (3.05, 27.0), "stream": True}),
            ],
        )
        reply = client.post_cohort_results(body)
    assert reply.answer is Answer.ACKNOWLEDGED
    assert seen.identities == []


@pytest.mark.parametrize("status", [403, 422])
def test_cohort_post_refusal_is_body_refused(client: HubClient, status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/cohort/results", status=status, json={"detail": "nope"})
        reply = client.post_cohort_results({"query_id": "q"})
    assert reply.answer is Answer.BODY_REFUSED
    assert str(status) in reply.detail


@pytest.mark.parametrize(
    "response",
    [
        {"status": 500, "json": {"detail": "boom"}},
        {"status": 502, "body": HTML_PAGE, "content_type": "text/html"},
        {"status": 401, "json": {"detail": "Invalid API key"}},
    ],
)
def test_cohort_post_trouble_raises(client: HubClient, response: dict[str, Any]) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{HUB}/cohort/results", **response)
        with pytest.raises((HubError, HubKeyRejected)):
            client.post_cohort_results({"query_id": "q"})


# --- reply size cap ----------------------------------------------------------------------------


def test_declared_content_length_over_the_cap_is_refused(client: HubClient, seen: Seen) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            json=HEARTBEAT_BODY,
            headers={"Content-Length": str(SMALL_REPLY_CAP + 1)},
        )
        with pytest.raises(HubError, match="cap"):
            client.heartbeat(None)
    assert seen.identities == []


def test_streamed_reply_over_the_cap_is_refused(client: HubClient, seen: Seen) -> None:
    oversized = json.dumps({**HEARTBEAT_BODY, "padding": "x" * SMALL_REPLY_CAP})
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{HUB}/trust/heartbeat",
            body=oversized,
            content_type="application/json",
            auto_calculate_content_length=False,
        )
        with pytest.raises(HubError, match="refused while reading"):
            client.heartbeat(None)
        assert len(rsps.calls) == 1
    assert seen.identities == []


# --- a real loopback server: what `responses` cannot show ---------------------------------------


class LoopbackHub(http.server.ThreadingHTTPServer):
    """Counts accepted connections and records each request's Authorization header."""

    daemon_threads = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.authorizations: list[str | None] = []

    def get_request(self) -> tuple[socket.socket, Any]:
        accepted = super().get_request()
        self.connections += 1
        return accepted

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up mid-reply is the point of some tests, not an error."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class HeartbeatHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        assert isinstance(self.server, LoopbackHub)
        self.server.authorizations.append(self.headers.get("Authorization"))
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps(HEARTBEAT_BODY).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class DrippingHandler(HeartbeatHandler):
    """Sends headers at once, then one byte every 50 ms: never idle long enough to time out."""

    drip_seconds: ClassVar[float] = 0.05

    def do_POST(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(self.drip_seconds)
        except OSError:
            pass


class StallingHandler(HeartbeatHandler):
    """Sends headers and one byte, then nothing."""

    def do_POST(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            self.wfile.write(b"{")
            self.wfile.flush()
            time.sleep(1.0)
        except OSError:
            pass


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[LoopbackHub]:
    server = LoopbackHub(handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def heartbeat_hub() -> Iterator[LoopbackHub]:
    yield from _serve(HeartbeatHandler)


def test_dripping_reply_is_cut_off_at_the_wall_clock_deadline() -> None:
    for server in _serve(DrippingHandler):
        hub_client = HubClient(
            make_kit(server.url), threading.Event(), read_timeout=2.0, reply_deadline=0.3
        )
        started = time.monotonic()
        with pytest.raises(HubError, match="did not finish"):
            hub_client.heartbeat(None)
        elapsed = time.monotonic() - started
        hub_client.close()
        assert elapsed < 1.5


def test_reply_that_stalls_mid_body_is_a_hub_error_after_the_read_timeout() -> None:
    for server in _serve(StallingHandler):
        hub_client = HubClient(
            make_kit(server.url), threading.Event(), read_timeout=0.2, reply_deadline=5.0
        )
        started = time.monotonic()
        with pytest.raises(HubError):
            hub_client.heartbeat(None)
        elapsed = time.monotonic() - started
        hub_client.close()
        assert elapsed < 1.0


def test_heartbeats_reuse_one_kept_alive_connection(heartbeat_hub: LoopbackHub) -> None:
    hub_client = HubClient(make_kit(heartbeat_hub.url), threading.Event())
    first = hub_client.heartbeat(None)
    second = hub_client.heartbeat(None)
    third = hub_client.heartbeat(None)
    hub_client.close()
    assert first == second == third
    assert heartbeat_hub.connections == 1
    assert len(heartbeat_hub.authorizations) == 3


def test_netrc_in_home_does_not_replace_the_auth_header(
    heartbeat_hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login intruder password from-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    url = heartbeat_hub.url + "/trust/heartbeat"
    # The netrc is live: a client that trusted the environment would send Basic auth from it.
    assert requests.utils.get_netrc_auth(url) == ("intruder", "from-netrc")
    hub_client = HubClient(make_kit(heartbeat_hub.url), threading.Event())
    hub_client.heartbeat(None)
    hub_client.close()
    assert heartbeat_hub.authorizations == [HUB_KEY]


def test_hub_clients_share_one_verifying_tls_context() -> None:
    first, second = (HubClient(make_kit(), threading.Event()) for _ in range(2))
    try:
        adapters = [
            client.session.get_adapter(f"{HUB}/trust/heartbeat") for client in (first, second)
        ]
        contexts = [
            adapter.context for adapter in adapters if isinstance(adapter, PinnedTrustAdapter)
        ]
        assert len(contexts) == 2
        assert contexts[0] is contexts[1]
        assert contexts[0].verify_mode == ssl.CERT_REQUIRED
        assert contexts[0].check_hostname
    finally:
        first.close()
        second.close()
