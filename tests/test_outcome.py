"""Task outcomes: the result bodies the hub receives, and the gate every outcome passes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from trust_poller.outcome import (
    MAX_ERROR_CHARS,
    MAX_RESULT_CHARS,
    Outcome,
    bounded,
    failure,
    prepare_for_hub,
    success,
)
from trust_poller.redact import MASK, Redactor

SECRET = "tK3x9Qv_ZpL0aW7cR2mN5bY8dF1gH4jS6uE-oI0qXyA"
REDACTOR = Redactor([SECRET])


def result_document(outcome: Outcome) -> Any:
    assert outcome.result is not None
    return json.loads(outcome.result)


def cohort_error_post(error: str) -> dict[str, Any]:
    return {
        "query_id": "q-1",
        "trust_id": "6f1c2d3e-4b5a-4789-9abc-def012345678",
        "created": "2025-01-31",
        "record_count": 0,
        "data": [],
        "error": error,
    }


# --- body shapes -----------------------------------------------------------------------------


def test_failure_without_status_code_has_only_error_and_no_null() -> None:
    outcome = failure("unknown task type 'frobnicate'")
    assert outcome.success is False
    assert outcome.body() == {
        "success": False,
        "result": json.dumps({"error": "unknown task type 'frobnicate'"}),
    }
    assert "status_code" not in result_document(outcome)
    assert "null" not in (outcome.result or "")


@pytest.mark.parametrize("status_code", [404, 500, 503])
def test_failure_with_upstream_status_code_carries_it_as_an_integer(status_code: int) -> None:
    outcome = failure("imaging-api answered", status_code)
    assert result_document(outcome) == {"error": "imaging-api answered", "status_code": status_code}


def test_failure_result_is_a_json_string_not_an_object() -> None:
    body = failure("boom", 502).body()
    assert isinstance(body["result"], str)
    assert json.loads(json.dumps(body)) == body


def test_failure_keeps_its_cohort_post() -> None:
    post = cohort_error_post("500: internal_error")
    assert failure("boom", cohort_post=post).cohort_post == post
    assert failure("boom").cohort_post is None


def test_failure_error_is_bounded() -> None:
    document = result_document(failure("x" * (MAX_ERROR_CHARS * 3)))
    assert len(document["error"]) <= MAX_ERROR_CHARS
    assert document["error"].endswith("[truncated]")


def test_success_without_document_sends_null_result() -> None:
    assert success().body() == {"success": True, "result": None}


@pytest.mark.parametrize("document", [{"row_count": 3, "columns": ["a"]}, [1, 2], "text", 0])
def test_success_document_becomes_json_text(document: Any) -> None:
    outcome = success(document)
    assert outcome.success is True
    assert isinstance(outcome.result, str)
    assert json.loads(outcome.result) == document


def test_outcome_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        success().success = False  # type: ignore[misc]


# --- bounded ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, MAX_ERROR_CHARS - 1, MAX_ERROR_CHARS])
def test_bounded_leaves_text_within_the_limit_unchanged(length: int) -> None:
    text = "e" * length
    assert bounded(text) == text


@pytest.mark.parametrize("length", [MAX_ERROR_CHARS + 1, MAX_ERROR_CHARS * 10])
def test_bounded_cuts_longer_text_to_the_limit_and_says_so(length: int) -> None:
    text = "".join(str(i % 10) for i in range(length))
    cut = bounded(text)
    assert len(cut) <= MAX_ERROR_CHARS
    assert cut.endswith(" [truncated]")
    kept = cut.removesuffix(" [truncated]")
    assert text.startswith(kept)
    assert len(kept) >= MAX_ERROR_CHARS - 20


def test_bounded_honours_a_custom_limit() -> None:
    cut = bounded("a" * 100, limit=40)
    assert len(cut) <= 40
    assert cut.startswith("a" * 20)
    assert cut.endswith("[truncated]")


# --- prepare_for_hub -------------------------------------------------------------------------


def test_result_at_the_limit_passes_unchanged() -> None:
    result = "r" * MAX_RESULT_CHARS
    prepared = prepare_for_hub(Outcome(True, result), Redactor())
    assert prepared.success is True
    assert prepared.result is not None
    assert len(prepared.result) == MAX_RESULT_CHARS


def test_result_over_the_limit_becomes_a_short_failure_naming_the_limit() -> None:
    prepared = prepare_for_hub(Outcome(True, "r" * (MAX_RESULT_CHARS + 1)), Redactor())
    assert prepared.success is False
    assert prepared.result is not None
    assert len(prepared.result) < 1000
    document = json.loads(prepared.result)
    assert set(document) == {"error"}
    assert "10,000,000" in document["error"]
    assert "10,000,001" in document["error"]


def test_oversized_result_keeps_its_scrubbed_cohort_post() -> None:
    post = cohort_error_post(f"500: key {SECRET} refused")
    prepared = prepare_for_hub(Outcome(True, "r" * (MAX_RESULT_CHARS + 1), post), REDACTOR)
    assert prepared.success is False
    assert prepared.cohort_post == cohort_error_post(f"500: key {MASK} refused")


def test_secret_is_scrubbed_from_the_result() -> None:
    outcome = failure(f"data-access-api echoed the header X-Key: {SECRET}", 401)
    prepared = prepare_for_hub(outcome, REDACTOR)
    assert prepared.result is not None
    assert SECRET not in prepared.result
    assert result_document(prepared) == {
        "error": f"data-access-api echoed the header X-Key: {MASK}",
        "status_code": 401,
    }


def test_url_credentials_are_scrubbed_from_the_result() -> None:
    prepared = prepare_for_hub(success({"xnat": "https://admin:pw@xnat/x"}), Redactor())
    assert result_document(prepared) == {"xnat": f"https://{MASK}@xnat/x"}


def test_secrets_are_scrubbed_from_nested_cohort_post_strings() -> None:
    post: dict[str, Any] = {
        "query_id": "q-1",
        "record_count": 7,
        "suppressed": False,
        "error": None,
        "data": [
            {"name": f"gender {SECRET}", "results": [{"value": f"v-{SECRET}", "count": 7}]},
            {"name": "age", "results": []},
        ],
    }
    prepared = prepare_for_hub(Outcome(True, None, post), REDACTOR)
    assert prepared.cohort_post == {
        "query_id": "q-1",
        "record_count": 7,
        "suppressed": False,
        "error": None,
        "data": [
            {"name": f"gender {MASK}", "results": [{"value": f"v-{MASK}", "count": 7}]},
            {"name": "age", "results": []},
        ],
    }
    assert post["data"][0]["name"] == f"gender {SECRET}"  # the original is not mutated


def test_prepare_for_hub_keeps_success_null_result_and_clean_post_as_they_are() -> None:
    post = cohort_error_post("504: query_timeout")
    prepared = prepare_for_hub(Outcome(True, None, post), REDACTOR)
    assert prepared == Outcome(True, None, post)


def test_prepare_for_hub_keeps_a_failure_a_failure() -> None:
    outcome = failure("imaging-api answered 404", 404)
    assert prepare_for_hub(outcome, REDACTOR) == outcome
