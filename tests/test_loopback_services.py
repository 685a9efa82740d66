"""The loopback trust services answer the routes the task handlers and health probes call."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from trust_poller.playground.loopback_services import LoopbackServices

INTERNAL_KEY = "internal-secret"
ADMIN_KEY = "a" * 64


@pytest.fixture
def services() -> Iterator[LoopbackServices]:
    with LoopbackServices(internal_key=INTERNAL_KEY, admin_key=ADMIN_KEY) as running:
        yield running


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as client:
        client.trust_env = False  # no proxy from the environment for loopback
        client.headers["X-Trust-Internal-Service-Key"] = INTERNAL_KEY
        yield client


def cohort_payload() -> dict[str, Any]:
    return {
        "encrypted_project_id": "ZW52ZWxvcGU=",
        "query_id": str(uuid.uuid4()),
        "query_name": "all",
        "query": "SELECT * FROM person",
        "trust_id": str(uuid.uuid4()),
    }


ROUTES_NEEDING_THE_KEY = [
    ("POST", "/cohort"),
    ("POST", "/cohort/snapshot"),
    ("POST", "/projects/create-project-from-central-hub-project"),
    ("DELETE", "/projects/abc"),
    ("GET", "/retrieval/import_status_count/abc?encoded_query=x"),
    ("PUT", "/retrieval/reimport_imaging_project_studies/abc?encoded_query=x"),
    ("PUT", "/users"),
    ("GET", "/imaging/ping_pacs"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES_NEEDING_THE_KEY)
@pytest.mark.parametrize("presented", [None, "wrong"])
def test_internal_routes_answer_401_json_without_the_internal_key(
    services: LoopbackServices, method: str, path: str, presented: str | None
) -> None:
    headers = {} if presented is None else {"X-Trust-Internal-Service-Key": presented}
    with requests.Session() as anonymous:
        anonymous.trust_env = False
        reply = anonymous.request(method, services.url + path, headers=headers, json={}, timeout=5)
    assert reply.status_code == 401
    assert "detail" in reply.json()


def test_health_and_xnat_build_info_need_no_key(services: LoopbackServices) -> None:
    with requests.Session() as anonymous:
        anonymous.trust_env = False
        health = anonymous.get(f"{services.url}/health", timeout=5)
        build = anonymous.get(f"{services.url}/xapi/siteConfig/buildInfo", timeout=5)
    assert health.json() == {"status": "ok", "version": "svc-1.2.3"}
    assert build.status_code == 200
    assert isinstance(build.json()["version"], str)


def test_a_custom_internal_key_header_is_honoured(session: requests.Session) -> None:
    with LoopbackServices(internal_key="k2", internal_key_header="X-Other") as services:
        refused = session.get(f"{services.url}/imaging/ping_pacs", timeout=5)
        accepted = session.get(
            f"{services.url}/imaging/ping_pacs", headers={"x-other": "k2"}, timeout=5
        )
    assert refused.status_code == 401
    assert accepted.json() == {"successful": True}


def test_cohort_echoes_the_ids_with_numeric_values_the_client_must_stringify(
    services: LoopbackServices, session: requests.Session
) -> None:
    payload = cohort_payload()
    reply = session.post(f"{services.url}/cohort", json=payload, timeout=5)
    assert reply.status_code == 200
    body = reply.json()
    assert (body["query_id"], body["trust_id"]) == (payload["query_id"], payload["trust_id"])
    assert body["error"] is None
    assert body["suppressed"] is False
    assert isinstance(body["record_count"], int)
    values = [row["value"] for field in body["data"] for row in field["results"]]
    assert any(type(value) is int for value in values)
    assert any(type(value) is float for value in values)
    assert services.calls[-1].body == payload


def test_cohort_without_its_ids_is_422(
    services: LoopbackServices, session: requests.Session
) -> None:
    reply = session.post(f"{services.url}/cohort", json={"query": "SELECT 1"}, timeout=5)
    assert reply.status_code == 422


def test_a_snapshot_needs_the_cohort_admin_key(
    services: LoopbackServices, session: requests.Session
) -> None:
    url = f"{services.url}/cohort/snapshot"
    body = {"encrypted_project_id": "ZW52", "query": "SELECT 1"}
    missing = session.post(url, json=body, timeout=5)
    wrong = session.post(url, json=body, headers={"X-Cohort-Admin-Key": "b" * 64}, timeout=5)
    right = session.post(url, json=body, headers={"X-Cohort-Admin-Key": ADMIN_KEY}, timeout=5)
    assert (missing.status_code, wrong.status_code, right.status_code) == (403, 403, 200)
    assert set(right.json()) == {"row_count", "columns", "snapshot_at", "query_hash"}


def test_a_snapshot_is_open_to_any_admin_key_when_none_is_configured(
    session: requests.Session,
) -> None:
    with LoopbackServices(internal_key=INTERNAL_KEY) as services:
        reply = session.post(f"{services.url}/cohort/snapshot", json={"query": "x"}, timeout=5)
    assert reply.status_code == 200


def test_creating_a_project_is_counted_per_project_id(
    services: LoopbackServices, session: requests.Session
) -> None:
    project_id = str(uuid.uuid4())
    payload: dict[str, Any] = {
        "project_id": project_id,
        "trust_id": str(uuid.uuid4()),
        "project_name": "Lungs",
        "query": None,
        "users": [
            {"id": str(uuid.uuid4()), "email": "a@example.org", "is_disabled": False},
            {"id": str(uuid.uuid4()), "email": "b@example.org", "is_disabled": True},
        ],
        "dicom_to_nifti": True,
    }
    url = f"{services.url}/projects/create-project-from-central-hub-project"
    first = session.post(url, json=payload, timeout=5)
    session.post(url, json=payload, timeout=5)
    assert first.status_code == 200
    assert first.json()["name"] == "Lungs"
    assert first.json()["created_users"] == ["a@example.org"]
    assert isinstance(first.json()["ID"], str)
    assert services.created_projects == {project_id: 2}


def test_deleting_a_project_is_204_without_a_body_and_keeps_the_connection(
    services: LoopbackServices, session: requests.Session
) -> None:
    reply = session.delete(f"{services.url}/projects/{uuid.uuid4()}", timeout=5)
    assert (reply.status_code, reply.content) == (204, b"")
    assert session.get(f"{services.url}/health", timeout=5).ok
    assert services.connections_opened == 1


def test_import_status_and_reimport_take_the_encoded_query(
    services: LoopbackServices, session: requests.Session
) -> None:
    status = session.get(
        f"{services.url}/retrieval/import_status_count/p1",
        params={"encoded_query": "a b&c"},
        timeout=5,
    )
    reimport = session.put(
        f"{services.url}/retrieval/reimport_imaging_project_studies/p1",
        params={"encoded_query": "q"},
        timeout=5,
    )
    assert status.status_code == 200
    assert status.json()["encoded_query"] == "a b&c"
    assert reimport.status_code == 200
    assert [call.path for call in services.calls] == [
        "/retrieval/import_status_count/p1",
        "/retrieval/reimport_imaging_project_studies/p1",
    ]
    assert services.calls[1].query == "encoded_query=q"


def test_import_status_without_an_encoded_query_is_422(
    services: LoopbackServices, session: requests.Session
) -> None:
    reply = session.get(f"{services.url}/retrieval/import_status_count/p1", timeout=5)
    assert reply.status_code == 422


def test_updating_a_user_is_200(services: LoopbackServices, session: requests.Session) -> None:
    body: dict[str, Any] = {"email": "a@example.org", "enabled": False}
    assert session.put(f"{services.url}/users", json=body, timeout=5).status_code == 200
    assert session.put(f"{services.url}/users", json={}, timeout=5).status_code == 422


def test_ping_pacs_reports_what_the_test_sets(
    services: LoopbackServices, session: requests.Session
) -> None:
    assert session.get(f"{services.url}/imaging/ping_pacs", timeout=5).json()["successful"]
    services.set_pacs(False)
    reply = session.get(f"{services.url}/imaging/ping_pacs", timeout=5)
    assert reply.json() == {"successful": False}


def test_a_delay_is_recorded_in_the_calls_start_and_end_times(
    services: LoopbackServices, session: requests.Session
) -> None:
    services.set_delay("/health", 0.15)
    session.get(f"{services.url}/health", timeout=5)
    services.set_delay("/health", 0)
    session.get(f"{services.url}/health", timeout=5)
    slow, fast = services.calls
    assert slow.finished_at is not None
    assert fast.finished_at is not None
    assert slow.finished_at - slow.started_at >= 0.15
    assert fast.finished_at - fast.started_at < 0.15


def test_stop_cuts_a_long_delay_short(session: requests.Session) -> None:
    services = LoopbackServices(internal_key=INTERNAL_KEY).start()
    services.set_delay("/cohort", 60)
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            session.post, f"{services.url}/cohort", json=cohort_payload(), timeout=10
        )
        assert services.wait_for(lambda: len(services.calls) == 1, 2)
        services.stop()
        # The delayed reply either gets out or its connection is closed: both end at once.
        with contextlib.suppress(requests.ConnectionError):
            pending.result(timeout=5)
    assert time.monotonic() - started < 3
    [call] = services.calls
    assert call.finished_at is not None
    assert call.finished_at - call.started_at < 3


def test_a_failure_answers_the_given_page_until_cleared(
    services: LoopbackServices, session: requests.Session
) -> None:
    page = b"<html><body>500 Internal Server Error</body></html>"
    services.set_failure("/cohort", 500, page, "text/html")
    failed = session.post(f"{services.url}/cohort", json=cohort_payload(), timeout=5)
    services.clear_failures()
    recovered = session.post(f"{services.url}/cohort", json=cohort_payload(), timeout=5)
    assert (failed.status_code, failed.content) == (500, page)
    assert failed.headers["Content-Type"] == "text/html"
    assert recovered.status_code == 200


def test_the_override_hook_answers_first(
    services: LoopbackServices, session: requests.Session
) -> None:
    def hook(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        if method == "DELETE":
            return 404, {"Content-Type": "application/json"}, b'{"detail": "no such project"}'
        return None

    services.override = hook
    deleted = session.delete(f"{services.url}/projects/p9", timeout=5)
    assert (deleted.status_code, deleted.json()) == (404, {"detail": "no such project"})
    assert session.get(f"{services.url}/health", timeout=5).ok
    assert [call.method for call in services.calls] == ["DELETE", "GET"]


def test_an_outage_resets_internal_calls(
    services: LoopbackServices, session: requests.Session
) -> None:
    services.set_outage("reset", paths=("/cohort",))
    with pytest.raises(requests.ConnectionError):
        session.post(f"{services.url}/cohort", json=cohort_payload(), timeout=5)
    assert session.get(f"{services.url}/health", timeout=5).ok


def test_calls_record_the_headers_sent(
    services: LoopbackServices, session: requests.Session
) -> None:
    session.get(f"{services.url}/imaging/ping_pacs", timeout=5)
    [call] = services.calls
    assert (call.method, call.path, call.query, call.body) == (
        "GET",
        "/imaging/ping_pacs",
        "",
        None,
    )
    assert call.headers["X-Trust-Internal-Service-Key"] == INTERNAL_KEY


def test_unknown_routes_are_404_and_wrong_methods_405(
    services: LoopbackServices, session: requests.Session
) -> None:
    assert session.get(f"{services.url}/nothing", timeout=5).status_code == 404
    assert session.get(f"{services.url}/users", timeout=5).status_code == 405
