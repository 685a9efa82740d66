"""The seven task handlers: payload checks, the exact upstream call, and what the hub gets."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from trust_poller import handlers
from trust_poller.handlers import (
    COHORT_TYPES,
    HANDLERS,
    SAFE_TO_REPEAT,
    HandlerContext,
    ordering_keys,
    run_handler,
)
from trust_poller.kit import Kit
from trust_poller.outcome import Outcome
from trust_poller.playground.kits import CANARY_HUB_KEY, CANARY_INTERNAL_KEY, kit_in_memory
from trust_poller.services import ServiceClient

INTERNAL_KEY = CANARY_INTERNAL_KEY
HUB_KEY = CANARY_HUB_KEY
AES_KEY = bytes(range(32))
AES_TEXT = base64.b64encode(AES_KEY).decode()
IMAGING = "http://imaging.test"
DATA = "http://data-access.test"
INTERNAL_HEADER = {"X-Trust-Internal-Service-Key": INTERNAL_KEY}
DEFAULT_TIMEOUT = matchers.request_kwargs_matcher({"timeout": (3.05, 30.0)})
COHORT_TIMEOUT = matchers.request_kwargs_matcher({"timeout": (3.05, 300.0)})

PROJECT_ID = "3f1c2a9e-8d4b-4c6a-9e2f-1a2b3c4d5e6f"
TRUST_ID = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
USER_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
QUERY_ID = "5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a"
IMAGING_PROJECT = "7e6d5c4b-3a29-4180-9f8e-7d6c5b4a3928"


@pytest.fixture
def kit() -> Kit:
    return kit_in_memory(
        aes_key=AES_KEY,
        api_key=HUB_KEY,
        internal_service_key=INTERNAL_KEY,
        data_access_api_url=DATA,
        imaging_api_url=IMAGING,
    )


@pytest.fixture
def ctx(kit: Kit) -> Iterator[HandlerContext]:
    with ServiceClient(kit) as services:
        yield HandlerContext("task-1", kit, services, today=lambda: "2026-01-02")


def error_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.success is False
    assert outcome.result is not None
    document: dict[str, Any] = json.loads(outcome.result)
    return document


def create_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "project_id": PROJECT_ID,
        "trust_id": TRUST_ID,
        "project_name": "Lung study",
        "query": "SELECT 1",
        "users": [{"id": USER_ID, "email": "Ada@Example.org"}],
    }
    payload.update(changes)
    return payload


def cohort_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "encrypted_project_id": "ZW52ZWxvcGU=",
        "query_id": QUERY_ID,
        "query_name": "adults",
        "query": "SELECT * FROM person",
        "trust_id": TRUST_ID,
    }
    payload.update(changes)
    return payload


def persist_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "project_id": PROJECT_ID,
        "trust_id": TRUST_ID,
        "encrypted_project_id": "ZW52ZWxvcGU=",
        "query": "SELECT * FROM person",
        "query_id": QUERY_ID,
    }
    payload.update(changes)
    return payload


# --- create_imaging ---


def test_create_imaging_posts_the_payload_with_defaults_and_returns_the_response(
    ctx: HandlerContext,
) -> None:
    upstream = {"ID": "XNAT_P1", "name": "Lung study", "created_users": ["ada"]}
    expected_body = create_payload(
        users=[{"id": USER_ID, "email": "Ada@Example.org", "is_disabled": False}],
        dicom_to_nifti=True,
    )
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{IMAGING}/projects/create-project-from-central-hub-project",
            json=upstream,
            match=[
                matchers.json_params_matcher(expected_body),
                matchers.header_matcher(INTERNAL_HEADER),
                DEFAULT_TIMEOUT,
            ],
        )
        outcome = run_handler("create_imaging", create_payload(), ctx)
    assert outcome == Outcome(success=True, result=json.dumps(upstream))


def test_create_imaging_keeps_given_flags_and_null_query(ctx: HandlerContext) -> None:
    payload = create_payload(
        query=None,
        dicom_to_nifti=False,
        users=[{"id": USER_ID, "email": "a@b.org", "is_disabled": True}],
    )
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{IMAGING}/projects/create-project-from-central-hub-project",
            json={"ID": "X"},
            match=[matchers.json_params_matcher(payload)],
        )
        assert run_handler("create_imaging", payload, ctx).success


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"project_id": "not-a-uuid"}, "field 'project_id' must be a UUID"),
        ({"trust_id": 7}, "field 'trust_id' must be a UUID (it is a number)"),
        ({"project_name": None}, "field 'project_name' must be a string (it is null)"),
        ({"query": 3}, "field 'query' must be a string or null (it is a number)"),
        ({"users": "ada"}, "field 'users' must be an array (it is a string)"),
        ({"users": ["ada"]}, "field 'users[0]' must be an object (it is a string)"),
        ({"users": [{"email": "a@b.org"}]}, "field 'users[0].id' must be a UUID (it is missing)"),
        ({"users": [{"id": USER_ID, "email": "nobody"}]}, "field 'users[0].email' must be an"),
        (
            {"users": [{"id": USER_ID, "email": "a@b.org", "is_disabled": "no"}]},
            "field 'users[0].is_disabled' must be true or false (it is a string)",
        ),
        ({"dicom_to_nifti": "yes"}, "field 'dicom_to_nifti' must be true or false"),
    ],
)
def test_create_imaging_rejects_bad_payloads_without_calling(
    ctx: HandlerContext, changes: dict[str, Any], error: str
) -> None:
    with responses.RequestsMock() as rsps:
        outcome = run_handler("create_imaging", create_payload(**changes), ctx)
        assert len(rsps.calls) == 0
    document = error_of(outcome)
    assert document["error"].startswith(f"invalid payload: {error}")
    assert "status_code" not in document
    assert outcome.cohort_post is None


def test_create_imaging_missing_field_fails(ctx: HandlerContext) -> None:
    payload = create_payload()
    del payload["users"]
    with responses.RequestsMock():
        outcome = run_handler("create_imaging", payload, ctx)
    assert error_of(outcome) == {
        "error": "invalid payload: field 'users' must be an array (it is missing)"
    }


def test_create_imaging_timeout_says_the_project_may_exist(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{IMAGING}/projects/create-project-from-central-hub-project",
            body=requests.exceptions.ReadTimeout("timed out"),
        )
        outcome = run_handler("create_imaging", create_payload(), ctx)
    assert error_of(outcome) == {
        "error": "imaging-api did not answer within 30 s; the project may have been created "
        f"anyway — check XNAT for project 'Lung study' (hub project {PROJECT_ID}) before retrying"
    }


def test_create_imaging_upstream_error_keeps_status_and_detail(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{IMAGING}/projects/create-project-from-central-hub-project",
            status=409,
            json={"detail": "Project Lung study already exists"},
        )
        outcome = run_handler("create_imaging", create_payload(), ctx)
    assert error_of(outcome) == {
        "error": "imaging-api answered 409: Project Lung study already exists",
        "status_code": 409,
    }


def test_create_imaging_non_json_success_fails_clearly(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{IMAGING}/projects/create-project-from-central-hub-project",
            body="<html>Welcome to XNAT</html>",
            content_type="text/html",
        )
        outcome = run_handler("create_imaging", create_payload(), ctx)
    assert error_of(outcome) == {
        "error": "imaging-api answered 200 with a body that is not JSON, JSON was expected"
    }


# --- delete_imaging ---


def test_delete_imaging_accepts_an_empty_204(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.delete(
            f"{IMAGING}/projects/{IMAGING_PROJECT}",
            status=204,
            body=b"",
            match=[matchers.header_matcher(INTERNAL_HEADER), DEFAULT_TIMEOUT],
        )
        outcome = run_handler("delete_imaging", {"imaging_project_id": IMAGING_PROJECT}, ctx)
    assert outcome == Outcome(success=True, result=None)


def test_delete_imaging_missing_project_reports_404(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.delete(
            f"{IMAGING}/projects/{IMAGING_PROJECT}", status=404, json={"detail": "Not Found"}
        )
        outcome = run_handler("delete_imaging", {"imaging_project_id": IMAGING_PROJECT}, ctx)
    assert error_of(outcome) == {"error": "imaging-api answered 404: Not Found", "status_code": 404}


def test_delete_imaging_html_500_reports_status_and_excerpt(ctx: HandlerContext) -> None:
    page = "<html><body>\n<h1>Internal   Server Error</h1>\n<p>trace id 42</p></body></html>"
    with responses.RequestsMock() as rsps:
        rsps.delete(
            f"{IMAGING}/projects/{IMAGING_PROJECT}",
            status=500,
            body=page,
            content_type="text/html",
        )
        outcome = run_handler("delete_imaging", {"imaging_project_id": IMAGING_PROJECT}, ctx)
    assert error_of(outcome) == {
        "error": "imaging-api answered 500: Internal Server Error trace id 42",
        "status_code": 500,
    }


@pytest.mark.parametrize("value", [None, "../etc", 12, f"{IMAGING_PROJECT}/x"])
def test_delete_imaging_requires_a_uuid(ctx: HandlerContext, value: object) -> None:
    with responses.RequestsMock() as rsps:
        outcome = run_handler("delete_imaging", {"imaging_project_id": value}, ctx)
        assert len(rsps.calls) == 0
    assert error_of(outcome)["error"].startswith(
        "invalid payload: field 'imaging_project_id' must be a UUID"
    )


# --- get_imaging_status / reimport_studies ---


def test_get_imaging_status_quotes_the_path_and_passes_the_query(ctx: HandlerContext) -> None:
    upstream = {"imported": 3, "total": 5}
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/retrieval/import_status_count/proj%2F..%2Fx%20y",
            json=upstream,
            match=[
                matchers.query_param_matcher({"encoded_query": "U0VMRUNUICo=&x"}),
                matchers.header_matcher(INTERNAL_HEADER),
                DEFAULT_TIMEOUT,
            ],
        )
        outcome = run_handler(
            "get_imaging_status",
            {"imaging_project_id": "proj/../x y", "encoded_query": "U0VMRUNUICo=&x"},
            ctx,
        )
        url = rsps.calls[0].request.url
    assert url == (
        f"{IMAGING}/retrieval/import_status_count/proj%2F..%2Fx%20y?encoded_query=U0VMRUNUICo%3D%26x"
    )
    assert outcome == Outcome(success=True, result=json.dumps(upstream))


def test_get_imaging_status_connection_refused(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{IMAGING}/retrieval/import_status_count/P1",
            body=requests.ConnectionError(ConnectionRefusedError(111, "Connection refused")),
        )
        outcome = run_handler(
            "get_imaging_status", {"imaging_project_id": "P1", "encoded_query": "q"}, ctx
        )
    assert error_of(outcome) == {"error": "imaging-api unreachable: connection refused"}


def test_get_imaging_status_oversize_response_fails(kit: Kit) -> None:
    with ServiceClient(kit, max_bytes=1000) as services, responses.RequestsMock() as rsps:
        rsps.get(f"{IMAGING}/retrieval/import_status_count/P1", body=b"[" + b"1," * 600 + b"1]")
        outcome = run_handler(
            "get_imaging_status",
            {"imaging_project_id": "P1", "encoded_query": "q"},
            HandlerContext("t", kit, services),
        )
    assert error_of(outcome) == {"error": "imaging-api response too large (over 1,000 bytes)"}


def test_reimport_studies_puts_with_the_query_and_returns_null(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.put(
            f"{IMAGING}/retrieval/reimport_imaging_project_studies/P%201",
            json={"queued": 4},
            match=[
                matchers.query_param_matcher({"encoded_query": "abc"}),
                matchers.header_matcher(INTERNAL_HEADER),
                DEFAULT_TIMEOUT,
            ],
        )
        outcome = run_handler(
            "reimport_studies", {"imaging_project_id": "P 1", "encoded_query": "abc"}, ctx
        )
    assert outcome == Outcome(success=True, result=None)


@pytest.mark.parametrize("task_type", ["get_imaging_status", "reimport_studies"])
@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"encoded_query": "q"}, "field 'imaging_project_id' must be a string (it is missing)"),
        ({"imaging_project_id": "P1", "encoded_query": 5}, "field 'encoded_query' must be a"),
        ({"imaging_project_id": " ", "encoded_query": "q"}, "field 'imaging_project_id' must n"),
    ],
)
def test_imaging_queries_reject_bad_payloads_without_calling(
    ctx: HandlerContext, task_type: str, payload: dict[str, Any], error: str
) -> None:
    with responses.RequestsMock() as rsps:
        outcome = run_handler(task_type, payload, ctx)
        assert len(rsps.calls) == 0
    assert error_of(outcome)["error"].startswith(f"invalid payload: {error}")


# --- update_user_profile ---


def test_update_user_profile_puts_the_payload(ctx: HandlerContext) -> None:
    payload = {"email": "ada@example.org", "enabled": False}
    with responses.RequestsMock() as rsps:
        rsps.put(
            f"{IMAGING}/users",
            json={"ok": True},
            match=[
                matchers.json_params_matcher(payload),
                matchers.header_matcher(INTERNAL_HEADER),
                DEFAULT_TIMEOUT,
            ],
        )
        outcome = run_handler("update_user_profile", payload, ctx)
    assert outcome == Outcome(success=True, result=None)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"email": "ada@example.org", "enabled": "true"}, "field 'enabled' must be true or false"),
        ({"email": "ada@example.org"}, "field 'enabled' must be true or false (it is missing)"),
        ({"email": "ada at example.org", "enabled": True}, "field 'email' must be an e-mail"),
        ({"email": "ada@localhost", "enabled": True}, "field 'email' must be an e-mail"),
        ({"email": ["ada@example.org"], "enabled": True}, "field 'email' must be a string"),
    ],
)
def test_update_user_profile_rejects_bad_payloads_without_calling(
    ctx: HandlerContext, payload: dict[str, Any], error: str
) -> None:
    with responses.RequestsMock() as rsps:
        outcome = run_handler("update_user_profile", payload, ctx)
        assert len(rsps.calls) == 0
    assert error_of(outcome)["error"].startswith(f"invalid payload: {error}")


# --- persist_cohort ---


def test_persist_cohort_posts_the_snapshot_with_the_admin_key(ctx: HandlerContext) -> None:
    upstream = {"row_count": 12, "columns": ["a"], "snapshot_at": "t", "query_hash": "h"}
    admin_key = hashlib.sha256(AES_TEXT.encode()).hexdigest()
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{DATA}/cohort/snapshot",
            json=upstream,
            match=[
                matchers.json_params_matcher(
                    {"encrypted_project_id": "ZW52ZWxvcGU=", "query": "SELECT * FROM person"}
                ),
                matchers.header_matcher({**INTERNAL_HEADER, "X-Cohort-Admin-Key": admin_key}),
                COHORT_TIMEOUT,
            ],
        )
        outcome = run_handler("persist_cohort", persist_payload(query_id=None), ctx)
    assert outcome == Outcome(success=True, result=json.dumps(upstream))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"query_id": 5}, "field 'query_id' must be a string or null (it is a number)"),
        ({"query": None}, "field 'query' must be a string (it is null)"),
        ({"trust_id": {}}, "field 'trust_id' must be a string (it is an object)"),
    ],
)
def test_persist_cohort_rejects_bad_payloads_without_calling(
    ctx: HandlerContext, changes: dict[str, Any], error: str
) -> None:
    with responses.RequestsMock() as rsps:
        outcome = run_handler("persist_cohort", persist_payload(**changes), ctx)
        assert len(rsps.calls) == 0
    assert error_of(outcome) == {"error": f"invalid payload: {error}"}
    assert outcome.cohort_post is None


def test_persist_cohort_timeout_uses_the_cohort_timeout(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{DATA}/cohort/snapshot",
            body=requests.exceptions.ReadTimeout("timed out"),
            match=[COHORT_TIMEOUT],
        )
        outcome = run_handler("persist_cohort", persist_payload(), ctx)
    assert error_of(outcome) == {"error": "data-access-api did not answer within 300 s"}


# --- cohort_query ---


def test_cohort_query_returns_the_response_as_cohort_post_with_string_values(
    ctx: HandlerContext,
) -> None:
    upstream = {
        "query_id": QUERY_ID,
        "trust_id": TRUST_ID,
        "created": "2026-01-02",
        "record_count": 9,
        "data": [
            {
                "name": "age",
                "results": [
                    {"value": 3, "count": 1},
                    {"value": 1.5, "count": 2},
                    {"value": None, "count": 3},
                    {"value": True, "count": 1},
                    {"value": "F", "count": 2},
                ],
            },
            {"name": "empty", "results": []},
        ],
        "error": None,
        "suppressed": False,
    }
    payload = cohort_payload()
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{DATA}/cohort",
            json=upstream,
            match=[
                matchers.json_params_matcher(payload),
                matchers.header_matcher(INTERNAL_HEADER),
                COHORT_TIMEOUT,
            ],
        )
        outcome = run_handler("cohort_query", payload, ctx)
        assert "X-Cohort-Admin-Key" not in rsps.calls[0].request.headers
    assert outcome.success is True
    assert outcome.result is None
    assert outcome.cohort_post is not None
    values = [item["value"] for item in outcome.cohort_post["data"][0]["results"]]
    assert values == ["3", "1.5", "None", "True", "F"]
    assert outcome.cohort_post["data"][1] == {"name": "empty", "results": []}
    assert {k: v for k, v in outcome.cohort_post.items() if k != "data"} == {
        k: v for k, v in upstream.items() if k != "data"
    }


def cohort_report(error: str) -> dict[str, Any]:
    return {
        "query_id": QUERY_ID,
        "trust_id": TRUST_ID,
        "created": "2026-01-02",
        "record_count": 0,
        "data": [],
        "error": error,
    }


def test_cohort_query_upstream_error_reports_status_and_detail(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DATA}/cohort", status=400, json={"detail": "query_failed: syntax error"})
        outcome = run_handler("cohort_query", cohort_payload(), ctx)
    assert error_of(outcome) == {
        "error": "data-access-api answered 400: query_failed: syntax error",
        "status_code": 400,
    }
    assert outcome.cohort_post == cohort_report("400: query_failed: syntax error")


def test_cohort_query_html_502_reports_status_and_excerpt(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{DATA}/cohort",
            status=502,
            body="<html><title>502 Bad Gateway</title></html>",
            content_type="text/html",
        )
        outcome = run_handler("cohort_query", cohort_payload(), ctx)
    assert error_of(outcome)["status_code"] == 502
    assert outcome.cohort_post == cohort_report("502: 502 Bad Gateway")


def test_cohort_query_timeout_reports_query_timeout(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DATA}/cohort", body=requests.exceptions.ReadTimeout("timed out"))
        outcome = run_handler("cohort_query", cohort_payload(), ctx)
    assert error_of(outcome) == {"error": "data-access-api did not answer within 300 s"}
    assert outcome.cohort_post == cohort_report("504: query_timeout")


def test_cohort_query_connection_refused_reports_internal_error(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(
            f"{DATA}/cohort",
            body=requests.ConnectionError(ConnectionRefusedError(111, "Connection refused")),
        )
        outcome = run_handler("cohort_query", cohort_payload(), ctx)
    assert error_of(outcome) == {"error": "data-access-api unreachable: connection refused"}
    assert outcome.cohort_post == cohort_report(
        "502: internal_error: data-access-api unreachable: connection refused"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "data-access-api answered 200 with a body that is not JSON"),
        (b"[1, 2]", "data-access-api answered with JSON that is not an object"),
    ],
)
def test_cohort_query_unusable_success_body_fails_with_a_report(
    ctx: HandlerContext, body: bytes, reason: str
) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DATA}/cohort", body=body)
        outcome = run_handler("cohort_query", cohort_payload(), ctx)
    error = error_of(outcome)["error"]
    assert error.startswith(reason)
    assert outcome.cohort_post == cohort_report(f"502: internal_error: {error}")


def test_cohort_query_bad_payload_reports_when_ids_are_known(ctx: HandlerContext) -> None:
    with responses.RequestsMock() as rsps:
        outcome = run_handler("cohort_query", cohort_payload(query=None), ctx)
        assert len(rsps.calls) == 0
    reason = "invalid payload: field 'query' must be a string (it is null)"
    assert error_of(outcome) == {"error": reason}
    assert outcome.cohort_post == cohort_report(f"400: internal_error: {reason}")


@pytest.mark.parametrize("missing", ["query_id", "trust_id"])
def test_cohort_query_bad_payload_without_ids_sends_no_report(
    ctx: HandlerContext, missing: str
) -> None:
    payload = cohort_payload()
    del payload[missing]
    with responses.RequestsMock() as rsps:
        outcome = run_handler("cohort_query", payload, ctx)
        assert len(rsps.calls) == 0
    assert error_of(outcome) == {
        "error": f"invalid payload: field '{missing}' must be a string (it is missing)"
    }
    assert outcome.cohort_post is None


def test_cohort_report_date_comes_from_the_context(kit: Kit) -> None:
    with ServiceClient(kit) as services, responses.RequestsMock():
        default_ctx = HandlerContext("t", kit, services)
        outcome = run_handler("cohort_query", cohort_payload(query_name=1), default_ctx)
    assert outcome.cohort_post is not None
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", outcome.cohort_post["created"])


# --- secrets, unknown types and handler bugs ---


@pytest.mark.parametrize(
    ("task_type", "payload", "method", "url"),
    [
        (
            "create_imaging",
            create_payload(),
            "POST",
            "/projects/create-project-from-central-hub-project",
        ),
        (
            "delete_imaging",
            {"imaging_project_id": IMAGING_PROJECT},
            "DELETE",
            f"/projects/{IMAGING_PROJECT}",
        ),
        (
            "get_imaging_status",
            {"imaging_project_id": "P", "encoded_query": "q"},
            "GET",
            "/retrieval/import_status_count/P",
        ),
        (
            "reimport_studies",
            {"imaging_project_id": "P", "encoded_query": "q"},
            "PUT",
            "/retrieval/reimport_imaging_project_studies/P",
        ),
        ("update_user_profile", {"email": "a@b.org", "enabled": True}, "PUT", "/users"),
        ("persist_cohort", persist_payload(), "POST", "/cohort/snapshot"),
        ("cohort_query", cohort_payload(), "POST", "/cohort"),
    ],
)
def test_no_failure_text_carries_the_internal_key(
    ctx: HandlerContext, task_type: str, payload: dict[str, Any], method: str, url: str
) -> None:
    base = DATA if task_type in COHORT_TYPES else IMAGING
    echo = {"detail": f"rejected headers {{'X-Trust-Internal-Service-Key': '{INTERNAL_KEY}'}}"}
    with responses.RequestsMock() as rsps:
        rsps.add(method, f"{base}{url}", status=500, json=echo)
        outcome = run_handler(task_type, payload, ctx)
    assert error_of(outcome)["status_code"] == 500
    sent = json.dumps([outcome.result, outcome.cohort_post])
    assert INTERNAL_KEY not in sent
    assert HUB_KEY not in sent
    assert hashlib.sha256(AES_TEXT.encode()).hexdigest() not in sent


def test_unknown_task_type_fails_without_calling(ctx: HandlerContext) -> None:
    with responses.RequestsMock():
        outcome = run_handler("format_disk", {}, ctx)
    assert error_of(outcome) == {"error": "unknown task type 'format_disk'"}


def test_handler_bug_becomes_a_failure_and_the_log_omits_the_payload(
    ctx: HandlerContext, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
        raise KeyError("boom")

    monkeypatch.setitem(HANDLERS, "delete_imaging", broken)
    with caplog.at_level(logging.ERROR, logger="trust_poller.handlers"):
        outcome = run_handler("delete_imaging", {"imaging_project_id": "SECRET-PROJECT"}, ctx)
    assert error_of(outcome) == {"error": "internal error in delete_imaging handler: KeyError"}
    assert "internal error in delete_imaging handler for task task-1" in caplog.text
    assert "SECRET-PROJECT" not in caplog.text


def test_cohort_handler_bug_still_sends_the_error_report(
    ctx: HandlerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_call(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(ctx.services, "call", broken_call)
    outcome = run_handler("cohort_query", cohort_payload(), ctx)
    assert error_of(outcome) == {"error": "internal error in cohort_query handler: RuntimeError"}
    assert outcome.cohort_post == cohort_report("500: internal_error: RuntimeError")


# --- registry facts the daemon relies on ---


def test_registry_lists_the_seven_types() -> None:
    assert set(HANDLERS) == {
        "cohort_query",
        "persist_cohort",
        "create_imaging",
        "delete_imaging",
        "get_imaging_status",
        "reimport_studies",
        "update_user_profile",
    }
    assert frozenset(HANDLERS) - {"create_imaging"} == SAFE_TO_REPEAT
    assert {"cohort_query", "persist_cohort"} == COHORT_TYPES


@pytest.mark.parametrize(
    ("task_type", "payload", "keys"),
    [
        ("delete_imaging", {"imaging_project_id": "P1"}, ("imaging:P1",)),
        ("get_imaging_status", {"imaging_project_id": "P1", "encoded_query": "q"}, ("imaging:P1",)),
        ("reimport_studies", {"imaging_project_id": "P1"}, ("imaging:P1",)),
        (
            "create_imaging",
            create_payload(users=[{"email": "Ada@Example.org"}, {"email": "ada@example.org"}, 7]),
            (f"imaging:{PROJECT_ID}", "user:ada@example.org"),
        ),
        (
            "update_user_profile",
            {"email": "Bob@Example.ORG", "enabled": True},
            ("user:bob@example.org",),
        ),
        ("update_user_profile", {"email": None}, ()),
        ("cohort_query", cohort_payload(), ()),
        ("persist_cohort", persist_payload(), ()),
        ("delete_imaging", {"imaging_project_id": 5}, ()),
    ],
)
def test_ordering_keys(task_type: str, payload: dict[str, Any], keys: tuple[str, ...]) -> None:
    assert ordering_keys(task_type, payload) == keys


def test_handler_functions_are_registered_by_name() -> None:
    assert HANDLERS["cohort_query"] is handlers.cohort_query
    assert HANDLERS["create_imaging"] is handlers.create_imaging
