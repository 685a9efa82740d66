"""The loopback hub speaks hub-protocol.md over real loopback sockets."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from trust_poller import crypto
from trust_poller.errors import PayloadRejected
from trust_poller.playground.hub_tasks import REQUEUE_LIMIT_RESULT
from trust_poller.playground.loopback_hub import HEARTBEAT, POLL, LoopbackHub

A_SNAPSHOT: dict[str, Any] = {
    "services": {
        "trust-api": {"status": "healthy", "version": "0.1.0", "response_ms": 0},
        "omop": {"status": "down", "version": None, "response_ms": None},
    },
    "collected_at": "2026-01-01T00:00:00+00:00",
}


@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    with LoopbackHub() as running:
        yield running


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as client:
        client.trust_env = False  # no proxy from the environment for loopback
        yield client


def auth(hub: LoopbackHub) -> dict[str, str]:
    return {hub.api_key_header: hub.api_key}


def poll(hub: LoopbackHub, session: requests.Session) -> list[dict[str, Any]]:
    reply = session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5)
    assert reply.status_code == 200, reply.text
    tasks: list[dict[str, Any]] = reply.json()["tasks"]
    return tasks


def post_result(
    hub: LoopbackHub, session: requests.Session, task_id: str, body: Any
) -> requests.Response:
    url = f"{hub.url}/tasks/{task_id}/result"
    return session.post(url, headers=auth(hub), json=body, timeout=5)


def a_cohort_body(hub: LoopbackHub, **changes: Any) -> dict[str, Any]:
    body = {
        "query_id": str(uuid.uuid4()),
        "trust_id": hub.trust_id,
        "created": "2026-01-01",
        "record_count": 3,
        "data": [{"name": "gender", "results": [{"value": "8507", "count": 3}]}],
        "error": None,
        "suppressed": False,
    }
    return body | changes


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/trust/heartbeat"),
        ("GET", "/tasks/pending"),
        ("POST", f"/tasks/{uuid.uuid4()}/result"),
        ("POST", "/cohort/results"),
    ],
)
@pytest.mark.parametrize("presented", [None, "wrong", "Bearer {key}", "{key} "])
def test_every_endpoint_answers_401_without_the_exact_key(
    hub: LoopbackHub, session: requests.Session, method: str, path: str, presented: str | None
) -> None:
    headers = {} if presented is None else {"Authorization": presented.format(key=hub.api_key)}
    reply = session.request(method, hub.url + path, headers=headers, json={}, timeout=5)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "ApiKey"
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == {"detail": "Invalid API key"}


def test_a_custom_auth_header_is_the_only_one_accepted(session: requests.Session) -> None:
    with LoopbackHub(api_key_header="X-Trust-API-Key") as hub:
        url = f"{hub.url}/trust/heartbeat"
        wrong = session.post(url, headers={"Authorization": hub.api_key}, timeout=5)
        right = session.post(url, headers={"x-trust-api-key": hub.api_key}, timeout=5)
    assert wrong.status_code == 401
    assert right.status_code == 200


def test_heartbeat_reports_identity_version_and_key_fingerprint(
    hub: LoopbackHub, session: requests.Session
) -> None:
    reply = session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5)
    assert reply.json() == {
        "trust_id": hub.trust_id,
        "trust_name": "Loopback Trust",
        "message": "Heartbeat recorded",
        "hub_version": "loopback-1",
        "aes_key_fingerprint": crypto.key_fingerprint(hub.aes_key),
    }


def test_an_older_hub_omits_version_and_fingerprint(session: requests.Session) -> None:
    with LoopbackHub(report_fingerprint=False) as hub:
        reply = session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5)
    assert set(reply.json()) == {"trust_id", "trust_name", "message"}


def test_fingerprint_override_simulates_a_stale_kit(session: requests.Session) -> None:
    with LoopbackHub(fingerprint_override="000000000000") as hub:
        reply = session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5)
    assert reply.json()["aes_key_fingerprint"] == "000000000000"


def test_heartbeats_are_recorded_with_their_snapshot_or_none(
    hub: LoopbackHub, session: requests.Session
) -> None:
    url = f"{hub.url}/trust/heartbeat"
    assert session.post(url, headers=auth(hub), timeout=5).status_code == 200
    assert session.post(url, headers=auth(hub), json=A_SNAPSHOT, timeout=5).status_code == 200
    assert [beat.snapshot for beat in hub.heartbeats] == [None, A_SNAPSHOT]
    assert hub.heartbeats[0].at <= hub.heartbeats[1].at


def _changed_snapshot(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    snapshot: dict[str, Any] = json.loads(json.dumps(A_SNAPSHOT))
    target = snapshot
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return snapshot


@pytest.mark.parametrize(
    "snapshot",
    [
        [],
        {"services": {}, "collected_at": None},
        {"services": {f"s{i}": A_SNAPSHOT["services"]["omop"] for i in range(17)}},
        {"services": A_SNAPSHOT["services"]},
        A_SNAPSHOT | {"extra": 1},
        _changed_snapshot(("services", "Trust_API"), A_SNAPSHOT["services"]["omop"]),
        _changed_snapshot(("services", "x" * 33), A_SNAPSHOT["services"]["omop"]),
        _changed_snapshot(("services", "omop", "status"), "ok"),
        _changed_snapshot(("services", "omop", "version"), "v" * 65),
        _changed_snapshot(("services", "omop", "version"), 3),
        _changed_snapshot(("services", "omop", "response_ms"), -1),
        _changed_snapshot(("services", "omop", "response_ms"), 1_000_001),
        _changed_snapshot(("services", "omop", "response_ms"), 1.5),
        _changed_snapshot(("services", "omop", "response_ms"), True),
        _changed_snapshot(("services", "omop", "uptime"), 3),
        _changed_snapshot(("collected_at",), 12),
    ],
)
def test_heartbeat_rejects_a_snapshot_outside_the_schema_with_422(
    hub: LoopbackHub, session: requests.Session, snapshot: Any
) -> None:
    url = f"{hub.url}/trust/heartbeat"
    reply = session.post(url, headers=auth(hub), json=snapshot, timeout=5)
    assert reply.status_code == 422
    assert isinstance(reply.json()["detail"], list)
    assert reply.json()["detail"]
    assert hub.heartbeats == []


def test_heartbeat_rejects_a_body_that_is_not_json(
    hub: LoopbackHub, session: requests.Session
) -> None:
    url = f"{hub.url}/trust/heartbeat"
    reply = session.post(url, headers=auth(hub), data=b"{not json", timeout=5)
    assert reply.status_code == 422
    assert hub.heartbeats == []


def test_enqueued_payloads_open_with_the_kits_key_and_only_for_their_task_type(
    hub: LoopbackHub, session: requests.Session
) -> None:
    payload = {"query_id": str(uuid.uuid4()), "query": "SELECT 1"}
    task_id = hub.enqueue("cohort_query", payload)
    [task] = poll(hub, session)
    assert task["id"] == task_id
    assert task["task_type"] == "cohort_query"
    assert crypto.open_task_payload(hub.aes_key, "cohort_query", task["payload"]) == payload
    with pytest.raises(PayloadRejected):
        crypto.open_task_payload(hub.aes_key, "persist_cohort", task["payload"])


def test_a_raw_envelope_is_handed_out_unchanged(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue_envelope("cohort_query", "not-an-envelope", task_id=str(uuid.uuid4()))
    assert poll(hub, session) == [
        {
            "id": task_id,
            "task_type": "cohort_query",
            "payload": "not-an-envelope",
            "created_at": hub.task(task_id).created_at,
        }
    ]


def test_a_poll_claims_at_most_50_oldest_first_and_marks_them_in_progress(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_ids = [hub.enqueue("delete_imaging", {"n": n}) for n in range(55)]
    first = poll(hub, session)
    assert [task["id"] for task in first] == task_ids[:50]
    assert {hub.task(task_id).status for task_id in task_ids[:50]} == {"IN_PROGRESS"}
    assert {hub.task(task_id).status for task_id in task_ids[50:]} == {"PENDING"}
    assert [task["id"] for task in poll(hub, session)] == task_ids[50:]
    assert poll(hub, session) == []
    assert {hub.task(task_id).deliveries for task_id in task_ids} == {1}


def test_a_reply_carries_identity_and_an_empty_list_when_idle(
    hub: LoopbackHub, session: requests.Session
) -> None:
    reply = session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5)
    assert reply.json() == {"trust_id": hub.trust_id, "trust_name": hub.trust_name, "tasks": []}


def test_a_result_completes_the_task_and_a_second_one_is_409_naming_completed(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("get_imaging_status", {})
    poll(hub, session)
    first = post_result(hub, session, task_id, {"success": True, "result": '{"n": 1}'})
    assert first.status_code == 200
    assert first.json() == {
        "trust_id": hub.trust_id,
        "trust_name": hub.trust_name,
        "message": f"Task {task_id} result recorded",
    }
    second = post_result(hub, session, task_id, {"success": False, "result": None})
    assert second.status_code == 409
    assert second.json() == {"detail": f"Task {task_id} is not in progress (status: COMPLETED)"}
    task = hub.task(task_id)
    assert (task.status, task.success, task.result) == ("COMPLETED", True, '{"n": 1}')
    assert task.results_received == [
        {"success": True, "result": '{"n": 1}'},
        {"success": False, "result": None},
    ]


def test_a_failure_result_marks_the_task_failed(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    poll(hub, session)
    assert post_result(hub, session, task_id, {"success": False, "result": "{}"}).ok
    assert hub.task(task_id).status == "FAILED"


def test_a_result_for_a_pending_task_is_409_naming_pending(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    reply = post_result(hub, session, task_id, {"success": True, "result": None})
    assert reply.status_code == 409
    assert reply.json()["detail"].endswith("(status: PENDING)")


def test_an_unknown_task_is_404(hub: LoopbackHub, session: requests.Session) -> None:
    reply = post_result(hub, session, str(uuid.uuid4()), {"success": True, "result": None})
    assert reply.status_code == 404
    assert reply.json() == {"detail": "Task not found"}


def test_another_trusts_task_is_never_handed_out_and_its_result_is_403(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("delete_imaging", {}, trust_id=str(uuid.uuid4()))
    assert poll(hub, session) == []
    reply = post_result(hub, session, task_id, {"success": True, "result": None})
    assert reply.status_code == 403
    assert "detail" in reply.json()


@pytest.mark.parametrize(
    "body",
    [
        {"result": None},
        {"success": "yes", "result": None},
        {"success": 1, "result": None},
        {"success": True},
        {"success": True, "result": 5},
        {"success": True, "result": {"a": 1}},
        [True, None],
        {"success": True, "result": "x" * 10_000_001},
    ],
    ids=[
        "no-success",
        "success-string",
        "success-int",
        "no-result",
        "result-int",
        "result-object",
        "not-an-object",
        "result-too-long",
    ],
)
def test_a_malformed_result_body_is_422_and_leaves_the_task_in_progress(
    hub: LoopbackHub, session: requests.Session, body: Any
) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    poll(hub, session)
    reply = post_result(hub, session, task_id, body)
    assert reply.status_code == 422
    assert isinstance(reply.json()["detail"], list)
    assert hub.task(task_id).status == "IN_PROGRESS"


def test_a_result_of_exactly_ten_million_characters_is_accepted(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    poll(hub, session)
    reply = post_result(hub, session, task_id, {"success": True, "result": "x" * 10_000_000})
    assert reply.status_code == 200


def test_a_result_body_that_is_not_json_is_422(hub: LoopbackHub, session: requests.Session) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    poll(hub, session)
    url = f"{hub.url}/tasks/{task_id}/result"
    reply = session.post(url, headers=auth(hub), data=b"success=true", timeout=5)
    assert reply.status_code == 422
    assert hub.task(task_id).results_received == [b"success=true"]


def test_a_result_for_an_id_that_is_not_a_uuid_is_422(
    hub: LoopbackHub, session: requests.Session
) -> None:
    reply = post_result(hub, session, "not-a-uuid", {"success": True, "result": None})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["path", "task_id"]


def test_cohort_results_are_stored_per_query_and_trust_and_overwritten(
    hub: LoopbackHub, session: requests.Session
) -> None:
    url = f"{hub.url}/cohort/results"
    first = a_cohort_body(hub)
    second = a_cohort_body(hub, query_id=first["query_id"], record_count=4)
    for body in (first, second):
        reply = session.post(url, headers=auth(hub), json=body, timeout=5)
        assert reply.status_code == 200
        assert reply.json() == {"message": "Cohort results processed successfully"}
    assert hub.cohort_results == {(first["query_id"], hub.trust_id): second}
    assert hub.cohort_posts == [first, second]


def test_cohort_results_for_another_trust_are_403(
    hub: LoopbackHub, session: requests.Session
) -> None:
    body = a_cohort_body(hub, trust_id=str(uuid.uuid4()))
    reply = session.post(f"{hub.url}/cohort/results", headers=auth(hub), json=body, timeout=5)
    assert reply.status_code == 403
    assert hub.cohort_results == {}
    assert hub.cohort_posts == [body]


@pytest.mark.parametrize(
    "change",
    [
        {"query_id": None},
        {"query_id": "q-1"},
        {"trust_id": 7},
        {"record_count": "3"},
        {"data": [{"name": "gender", "results": [{"value": 8507, "count": 3}]}]},
        {"data": [{"name": "age", "results": [{"value": 54.5, "count": 3}]}]},
        {"suppressed": "no"},
    ],
)
def test_a_malformed_cohort_body_is_422(
    hub: LoopbackHub, session: requests.Session, change: dict[str, Any]
) -> None:
    body = a_cohort_body(hub, **change)
    reply = session.post(f"{hub.url}/cohort/results", headers=auth(hub), json=body, timeout=5)
    assert reply.status_code == 422
    assert hub.cohort_results == {}


def test_a_cohort_body_that_is_not_an_object_is_422(
    hub: LoopbackHub, session: requests.Session
) -> None:
    reply = session.post(f"{hub.url}/cohort/results", headers=auth(hub), json=[1], timeout=5)
    assert reply.status_code == 422


def test_the_cohort_error_report_without_suppressed_is_accepted(
    hub: LoopbackHub, session: requests.Session
) -> None:
    body = a_cohort_body(hub, data=[], record_count=0, error="504: query_timeout")
    del body["suppressed"]
    reply = session.post(f"{hub.url}/cohort/results", headers=auth(hub), json=body, timeout=5)
    assert reply.status_code == 200


def test_rate_limits_answer_429_with_retry_after_and_are_counted(
    session: requests.Session,
) -> None:
    with LoopbackHub(polls_per_minute=2, heartbeats_per_minute=1) as hub:
        statuses = [
            session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5) for _ in range(3)
        ]
        beats = [
            session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5)
            for _ in range(2)
        ]
        cohorts = [
            session.post(
                f"{hub.url}/cohort/results", headers=auth(hub), json=a_cohort_body(hub), timeout=5
            )
            for _ in range(5)
        ]
        limited = hub.rate_limited
    assert [reply.status_code for reply in statuses] == [200, 200, 429]
    assert [reply.status_code for reply in beats] == [200, 429]
    assert statuses[2].json() == {"detail": "Rate limit exceeded"}
    assert 55 <= int(statuses[2].headers["Retry-After"]) <= 60
    assert {reply.status_code for reply in cohorts} == {200}
    assert limited == {HEARTBEAT: 1, POLL: 1, "result": 0}


def test_the_reaper_requeues_a_forgotten_task_then_fails_it_after_three_requeues(
    session: requests.Session,
) -> None:
    with LoopbackHub(requeue_after=0.05) as hub:
        task_id = hub.enqueue("delete_imaging", {})
        for requeues in (1, 2, 3):
            assert [task["id"] for task in poll(hub, session)] == [task_id]
            assert hub.wait_for(lambda: hub.task(task_id).status == "PENDING", 2)
            assert hub.task(task_id).retry_count == requeues
        assert [task["id"] for task in poll(hub, session)] == [task_id]
        assert hub.wait_for(lambda: hub.task(task_id).status == "FAILED", 2)
        task = hub.task(task_id)
    assert task.deliveries == 4
    assert task.retry_count == 3
    assert task.success is False
    assert task.result == REQUEUE_LIMIT_RESULT == '{"error": "Exceeded maximum retries (3)"}'


def test_a_result_after_requeue_is_409_pending_then_accepted_for_the_new_delivery(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    poll(hub, session)
    assert hub.reap() == 1
    stale = post_result(hub, session, task_id, {"success": True, "result": None})
    assert stale.json()["detail"].endswith("(status: PENDING)")
    poll(hub, session)
    assert post_result(hub, session, task_id, {"success": True, "result": None}).ok
    assert hub.task(task_id).status == "COMPLETED"
    assert hub.task(task_id).deliveries == 2


def test_a_cancelled_task_is_never_handed_out(hub: LoopbackHub, session: requests.Session) -> None:
    hub.cancel(hub.enqueue("delete_imaging", {}))
    assert poll(hub, session) == []


def test_outage_503_answers_hub_json(hub: LoopbackHub, session: requests.Session) -> None:
    hub.set_outage("503")
    reply = session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5)
    assert reply.status_code == 503
    assert reply.json() == {"detail": "Service unavailable"}
    assert hub.heartbeats == []


def test_outage_html502_answers_a_proxy_page(hub: LoopbackHub, session: requests.Session) -> None:
    hub.set_outage("html502")
    reply = session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5)
    assert reply.status_code == 502
    assert reply.headers["Content-Type"] == "text/html"
    assert "Bad Gateway" in reply.text


def test_outage_reset_drops_the_connection(hub: LoopbackHub, session: requests.Session) -> None:
    hub.enqueue("delete_imaging", {})
    hub.set_outage("reset")
    with pytest.raises(requests.ConnectionError):
        session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5)
    hub.set_outage(None)
    assert len(poll(hub, session)) == 1


def test_outage_hang_never_replies_until_it_ends(
    hub: LoopbackHub, session: requests.Session
) -> None:
    hub.set_outage("hang")
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=(1, 0.2))
    assert time.monotonic() - started < 1
    hub.set_outage(None)
    assert poll(hub, session) == []


def test_stop_ends_a_hanging_request_at_once(session: requests.Session) -> None:
    hub = LoopbackHub().start()
    hub.set_outage("hang")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            session.get, f"{hub.url}/tasks/pending", headers=auth(hub), timeout=10
        )
        assert hub.wait_for(lambda: hub.count("GET", "/tasks/pending") == 1, 2)
        started = time.monotonic()
        hub.stop()
        with pytest.raises(requests.ConnectionError):
            pending.result(timeout=5)
    assert time.monotonic() - started < 2


def test_an_outage_can_be_limited_to_some_paths(
    hub: LoopbackHub, session: requests.Session
) -> None:
    hub.set_outage("503", paths=("/tasks/",))
    assert session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5).ok
    reply = session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5)
    assert reply.status_code == 503


def test_refused_results_answer_the_chosen_status_and_are_still_recorded(
    hub: LoopbackHub, session: requests.Session
) -> None:
    task_id = hub.enqueue("delete_imaging", {})
    poll(hub, session)
    hub.refuse_results(500, "boom")
    as_hub = post_result(hub, session, task_id, {"success": True, "result": None})
    hub.refuse_results(403, "Forbidden", hub_json=False)
    as_proxy = post_result(hub, session, task_id, {"success": True, "result": None})
    hub.refuse_results(None)
    accepted = post_result(hub, session, task_id, {"success": True, "result": None})
    assert (as_hub.status_code, as_hub.json()) == (500, {"detail": "boom"})
    assert as_proxy.status_code == 403
    assert as_proxy.headers["Content-Type"] == "text/html"
    assert accepted.status_code == 200
    assert len(hub.task(task_id).results_received) == 3


def test_the_override_hook_answers_first_and_none_falls_through(
    hub: LoopbackHub, session: requests.Session
) -> None:
    seen: list[tuple[str, str, bytes]] = []

    def hook(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        seen.append((method, path, body))
        if path.endswith("/heartbeat"):
            return 418, {"Content-Type": "text/plain"}, b"teapot"
        return None

    hub.override = hook
    beat = session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), data=b"x", timeout=5)
    assert (beat.status_code, beat.text) == (418, "teapot")
    assert poll(hub, session) == []
    assert seen == [("POST", "/api/trust/heartbeat", b"x"), ("GET", "/api/tasks/pending", b"")]


def test_identity_override_makes_replies_claim_another_trust(
    hub: LoopbackHub, session: requests.Session
) -> None:
    other = str(uuid.uuid4())
    hub.identity_override(other)
    beat = session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), timeout=5)
    pending = session.get(f"{hub.url}/tasks/pending", headers=auth(hub), timeout=5)
    assert beat.json()["trust_id"] == pending.json()["trust_id"] == other


def test_a_kept_alive_session_uses_one_connection_and_requests_are_logged(
    hub: LoopbackHub, session: requests.Session
) -> None:
    session.post(f"{hub.url}/trust/heartbeat", headers=auth(hub), json=A_SNAPSHOT, timeout=5)
    poll(hub, session)
    assert hub.connections_opened == 1
    log = hub.requests_log
    assert [(entry.method, entry.path, entry.connection) for entry in log] == [
        ("POST", "/api/trust/heartbeat", 1),
        ("GET", "/api/tasks/pending", 1),
    ]
    assert log[0].header(hub.api_key_header) == hub.api_key
    assert json.loads(log[0].body) == A_SNAPSHOT
    assert hub.count("POST", "/trust/heartbeat") == hub.count("POST", "/api/trust/") == 1
    assert hub.count("GET", "/tasks/") == 1


def test_unknown_paths_and_methods_are_404_and_405(
    hub: LoopbackHub, session: requests.Session
) -> None:
    assert session.get(f"{hub.url}/nothing", headers=auth(hub), timeout=5).status_code == 404
    assert session.get(f"{hub.url}/trust/heartbeat", timeout=5).status_code == 405


def test_kit_values_point_a_kit_at_this_hub(hub: LoopbackHub) -> None:
    values = hub.kit_values()
    assert values["CENTRAL_HUB_API_URL"] == f"http://127.0.0.1:{hub.port}/api"
    assert values["TRUST_API_KEY"] == hub.api_key
    assert values["EXPECTED_TRUST_ID"] == hub.trust_id
    assert base64.b64decode(values["AES_KEY_BASE64"]) == hub.aes_key
