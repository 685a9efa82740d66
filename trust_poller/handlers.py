"""What happens to each task type: check the payload, call one trust-internal service, answer.

Handlers are plain functions `(payload, ctx) -> Outcome` registered in `HANDLERS`. They know
nothing about the hub: a cohort_query returns the body the daemon must post to
/cohort/results as `Outcome.cohort_post`, and the daemon posts it before the task's result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from trust_poller import payloads
from trust_poller.kit import Kit
from trust_poller.outcome import Outcome, bounded, failure, success
from trust_poller.payloads import InvalidPayload
from trust_poller.services import ServiceClient, ServiceError

log = logging.getLogger(__name__)

IMAGING = "imaging-api"
DATA_ACCESS = "data-access-api"
COHORT_ERROR_CHARS = 500


def utc_today() -> str:
    return datetime.now(UTC).date().isoformat()


@dataclass(frozen=True)
class HandlerContext:
    """What a handler may use: the task id (for logs), the kit and the internal client."""

    task_id: str
    kit: Kit
    services: ServiceClient
    today: Callable[[], str] = field(default=utc_today)


Handler = Callable[[dict[str, Any], HandlerContext], Outcome]


def _path(value: str) -> str:
    return quote(value, safe="")


def _invalid(problem: InvalidPayload) -> Outcome:
    return failure(f"invalid payload: {problem}")


def _upstream_failure(error: ServiceError) -> Outcome:
    return failure(error.reason, error.status_code)


def create_imaging(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        body = payloads.create_imaging_body(payload)
    except InvalidPayload as problem:
        return _invalid(problem)
    url = f"{ctx.kit.imaging_api_url}/projects/create-project-from-central-hub-project"
    try:
        reply = ctx.services.call("POST", url, json=body, service=IMAGING)
        return success(reply.json())
    except ServiceError as error:
        if error.timed_out:
            # Running create_imaging twice creates users and e-mails them twice: say what to check.
            return failure(
                f"{error.reason}; the project may have been created anyway — check XNAT for "
                f"project {body['project_name']!r} (hub project {body['project_id']}) "
                "before retrying"
            )
        return _upstream_failure(error)


def delete_imaging(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        project = payloads.uuid_text(payload, "imaging_project_id")
    except InvalidPayload as problem:
        return _invalid(problem)
    url = f"{ctx.kit.imaging_api_url}/projects/{_path(project)}"
    try:
        ctx.services.call("DELETE", url, service=IMAGING)
    except ServiceError as error:
        return _upstream_failure(error)
    return success()


def get_imaging_status(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        project = payloads.string(payload, "imaging_project_id")
        encoded_query = payloads.string(payload, "encoded_query")
    except InvalidPayload as problem:
        return _invalid(problem)
    url = f"{ctx.kit.imaging_api_url}/retrieval/import_status_count/{_path(project)}"
    try:
        reply = ctx.services.call(
            "GET", url, params={"encoded_query": encoded_query}, service=IMAGING
        )
        return success(reply.json())
    except ServiceError as error:
        return _upstream_failure(error)


def reimport_studies(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        project = payloads.string(payload, "imaging_project_id")
        encoded_query = payloads.string(payload, "encoded_query")
    except InvalidPayload as problem:
        return _invalid(problem)
    url = f"{ctx.kit.imaging_api_url}/retrieval/reimport_imaging_project_studies/{_path(project)}"
    try:
        ctx.services.call("PUT", url, params={"encoded_query": encoded_query}, service=IMAGING)
    except ServiceError as error:
        return _upstream_failure(error)
    return success()


def update_user_profile(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        payloads.email(payload, "email")
        payloads.boolean(payload, "enabled")
    except InvalidPayload as problem:
        return _invalid(problem)
    try:
        ctx.services.call("PUT", f"{ctx.kit.imaging_api_url}/users", json=payload, service=IMAGING)
    except ServiceError as error:
        return _upstream_failure(error)
    return success()


def persist_cohort(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        for key in ("project_id", "trust_id"):
            payloads.string(payload, key)
        body = {
            "encrypted_project_id": payloads.string(payload, "encrypted_project_id"),
            "query": payloads.string(payload, "query"),
        }
        payloads.optional_string(payload, "query_id")
    except InvalidPayload as problem:
        return _invalid(problem)
    try:
        reply = ctx.services.call(
            "POST",
            f"{ctx.kit.data_access_api_url}/cohort/snapshot",
            json=body,
            headers={"X-Cohort-Admin-Key": ctx.kit.cohort_admin_key},
            read_timeout=ctx.kit.cohort_query_timeout,
            service=DATA_ACCESS,
        )
        return success(reply.json())
    except ServiceError as error:
        return _upstream_failure(error)


def cohort_error_report(
    payload: dict[str, Any], ctx: HandlerContext, error: str
) -> dict[str, Any] | None:
    """The /cohort/results body saying this trust's query failed, when the payload names it."""
    query_id, trust_id = payload.get("query_id"), payload.get("trust_id")
    if not isinstance(query_id, str) or not isinstance(trust_id, str):
        return None
    return {
        "query_id": query_id,
        "trust_id": trust_id,
        "created": ctx.today(),
        "record_count": 0,
        "data": [],
        "error": bounded(error, COHORT_ERROR_CHARS),
    }


def _stringify_values(response: dict[str, Any]) -> dict[str, Any]:
    """Every data[].results[].value as Python's str() (3 → "3", None → "None")."""
    data = response.get("data")
    if not isinstance(data, list):
        return response
    groups = []
    for group in data:
        if isinstance(group, dict) and isinstance(group.get("results"), list):
            results = [
                {**item, "value": str(item["value"])}
                if isinstance(item, dict) and "value" in item
                else item
                for item in group["results"]
            ]
            group = {**group, "results": results}
        groups.append(group)
    return {**response, "data": groups}


def _cohort_failure(
    payload: dict[str, Any],
    ctx: HandlerContext,
    reason: str,
    report: str,
    status: int | None = None,
) -> Outcome:
    return failure(reason, status, cohort_post=cohort_error_report(payload, ctx, report))


def cohort_query(payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    try:
        for key in ("encrypted_project_id", "query_id", "query_name", "query", "trust_id"):
            payloads.string(payload, key)
    except InvalidPayload as problem:
        reason = f"invalid payload: {problem}"
        return _cohort_failure(payload, ctx, reason, f"400: internal_error: {reason}")
    try:
        reply = ctx.services.call(
            "POST",
            f"{ctx.kit.data_access_api_url}/cohort",
            json=payload,
            read_timeout=ctx.kit.cohort_query_timeout,
            service=DATA_ACCESS,
        )
        response = reply.json()
    except ServiceError as error:
        if error.status_code is not None and error.status_code >= 400:
            report = f"{error.status_code}: {error.detail}"
        elif error.timed_out:
            report = "504: query_timeout"
        else:
            report = f"502: internal_error: {error.reason}"
        return _cohort_failure(payload, ctx, error.reason, report, error.status_code)
    if not isinstance(response, dict):
        reason = f"{DATA_ACCESS} answered with JSON that is not an object"
        return _cohort_failure(payload, ctx, reason, f"502: internal_error: {reason}")
    return Outcome(success=True, result=None, cohort_post=_stringify_values(response))


HANDLERS: dict[str, Handler] = {
    "cohort_query": cohort_query,
    "persist_cohort": persist_cohort,
    "create_imaging": create_imaging,
    "delete_imaging": delete_imaging,
    "get_imaging_status": get_imaging_status,
    "reimport_studies": reimport_studies,
    "update_user_profile": update_user_profile,
}

# create_imaging creates a project and e-mails new users their credentials: never run it twice.
SAFE_TO_REPEAT: frozenset[str] = frozenset(HANDLERS) - {"create_imaging"}
COHORT_TYPES: frozenset[str] = frozenset({"cohort_query", "persist_cohort"})


def run_handler(task_type: str, payload: dict[str, Any], ctx: HandlerContext) -> Outcome:
    """Run the task's handler; an unknown type or a handler bug becomes a failed task."""
    handler = HANDLERS.get(task_type)
    if handler is None:
        return failure(f"unknown task type {bounded(task_type, 80)!r}")
    try:
        return handler(payload, ctx)
    except Exception as exc:
        # The traceback goes to the journal; the payload never does.
        log.exception("internal error in %s handler for task %s", task_type, ctx.task_id)
        outcome = failure(f"internal error in {task_type} handler: {type(exc).__name__}")
        if task_type == "cohort_query":
            report = f"500: internal_error: {type(exc).__name__}"
            outcome = replace(outcome, cohort_post=cohort_error_report(payload, ctx, report))
        return outcome


def ordering_keys(task_type: str, payload: dict[str, Any]) -> tuple[str, ...]:
    """Keys of the state a task touches: tasks sharing a key must run one after another."""
    keys: list[str] = []
    if isinstance(payload.get("imaging_project_id"), str):
        keys.append(f"imaging:{payload['imaging_project_id']}")
    if task_type == "create_imaging" and isinstance(payload.get("project_id"), str):
        keys.append(f"imaging:{payload['project_id']}")
    emails: list[Any] = []
    if task_type == "update_user_profile":
        emails.append(payload.get("email"))
    if task_type == "create_imaging" and isinstance(payload.get("users"), list):
        emails.extend(user.get("email") for user in payload["users"] if isinstance(user, dict))
    keys.extend(f"user:{email.lower()}" for email in emails if isinstance(email, str))
    return tuple(dict.fromkeys(keys))
