"""The outbox sender against the loopback hub: every reply read as "What a refusal means" says."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tenacity import wait_none

from trust_poller.dispatch import StateWriter
from trust_poller.hub import Halted, HubClient
from trust_poller.identity import IdentityGuard
from trust_poller.kit import Kit, load_kit
from trust_poller.ledger import ClaimedTask, Ledger, TaskState
from trust_poller.outcome import Outcome, failure, success
from trust_poller.pacing import HubBudgets, HubTrouble
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices
from trust_poller.poller import Daemon
from trust_poller.redact import Redactor
from trust_poller.reporter import REFUSED_MARKER, Reporter

KitWriter = Callable[..., Path]
DONE = success({"counts": {"IMPORTED": 3}})


@pytest.fixture
def kit(write_kit: KitWriter) -> Kit:
    return load_kit(write_kit())


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def make_reporter(kit: Kit, ledger: Ledger, results_per_minute: float = 6000) -> Reporter:
    halt = threading.Event()
    reporter = Reporter(
        kit,
        ledger,
        HubBudgets(6000, 6000, results_per_minute),
        IdentityGuard(None, halt),
        HubTrouble(),
        StateWriter(halt),
        Redactor(),
        halt,
    )
    reporter.retry_wait = wait_none()
    return reporter


@pytest.fixture
def reporter(kit: Kit, ledger: Ledger) -> Reporter:
    return make_reporter(kit, ledger)


@pytest.fixture
def client(kit: Kit) -> Iterator[HubClient]:
    hub_client = HubClient(kit, threading.Event())
    yield hub_client
    hub_client.close()


def claim_all(client: HubClient, ledger: Ledger) -> list[str]:
    """Poll the hub (its tasks go IN_PROGRESS) and record the tasks, as a claim does."""
    _identity, tasks = client.pending_tasks(None)
    ledger.record_claims(
        [ClaimedTask(t.id, t.task_type, str(t.payload), t.created_at) for t in tasks]
    )
    return [task.id for task in tasks]


def finish(ledger: Ledger, task_id: str, outcome: Outcome) -> None:
    ledger.mark_started(task_id)
    ledger.mark_finished(task_id, outcome)


def finished_task(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, outcome: Outcome = DONE
) -> str:
    """A task the hub handed out and whose result waits in the outbox."""
    task_id = hub.enqueue("get_imaging_status", {"imaging_project_id": "p", "encoded_query": "q"})
    assert claim_all(client, ledger) == [task_id]
    finish(ledger, task_id, outcome)
    return task_id


def state_of(ledger: Ledger, task_id: str) -> TaskState:
    entry = ledger.get(task_id)
    assert entry is not None
    return entry.state


def posted_paths(hub: LoopbackHub) -> list[str]:
    return [r.route for r in hub.requests_log if r.method == "POST" and "heartbeat" not in r.route]


# --- final answers ----------------------------------------------------------------------------


def test_200_acknowledges_the_result_and_empties_the_outbox(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    task_id = finished_task(hub, client, ledger)

    assert reporter.send_pending(client) is True

    task = hub.task(task_id)
    assert task.status == "COMPLETED"
    assert task.results_received == [DONE.body()]
    assert state_of(ledger, task_id) is TaskState.ACKNOWLEDGED
    assert ledger.unsent() == []


@pytest.mark.parametrize("recorded", [DONE, failure("already failed")])
def test_409_naming_completed_or_failed_retires_the_result(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter, recorded: Outcome
) -> None:
    task_id = finished_task(hub, client, ledger)
    client.report_result(None, task_id, recorded.body())  # another delivery already reported
    final = "COMPLETED" if recorded.success else "FAILED"

    assert reporter.send_pending(client) is True

    entry = ledger.get(task_id)
    assert entry is not None
    assert entry.state is TaskState.RETIRED
    assert f"status: {final}" in (entry.note or "")
    assert hub.task(task_id).status == final
    assert len(hub.task(task_id).results_received) == 2
    assert reporter.send_pending(client) is True
    assert len(hub.task(task_id).results_received) == 2, "a retired result is never re-sent"


def test_409_naming_pending_keeps_the_result_and_a_redelivery_reports_it_without_rerunning(
    hub: LoopbackHub,
    client: HubClient,
    kit: Kit,
    ledger: Ledger,
    reporter: Reporter,
    services: LoopbackServices,
) -> None:
    task_id = finished_task(hub, client, ledger)
    hub.reap(older_than=0)  # the hub's reaper re-queued it while the result was on its way

    assert reporter.send_pending(client) is True

    entry = ledger.get(task_id)
    assert entry is not None
    assert entry.state is TaskState.FINISHED
    assert entry.awaiting_redelivery is True
    assert ledger.unsent() == [], "nothing is sent until the hub delivers the task again"
    assert hub.task(task_id).status == "PENDING"

    daemon = Daemon(kit, ledger, Redactor())
    assert daemon.claim(client) == 1  # the redelivery
    assert daemon.pool.waiting == 0, "a finished task is never queued to run again"
    assert reporter.send_pending(client) is True

    task = hub.task(task_id)
    assert task.status == "COMPLETED"
    assert task.deliveries == 2
    assert task.results_received == [DONE.body(), DONE.body()]
    assert state_of(ledger, task_id) is TaskState.ACKNOWLEDGED
    assert services.calls == []


@pytest.mark.parametrize("status", [403, 404])
def test_hub_403_or_404_retires_the_result_with_a_warning(
    hub: LoopbackHub,
    client: HubClient,
    ledger: Ledger,
    reporter: Reporter,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    task_id = str(uuid.uuid4())
    if status == 403:
        hub.enqueue("delete_imaging", {"imaging_project_id": "p"}, task_id=task_id, trust_id="x")
    ledger.record_claims([ClaimedTask(task_id, "delete_imaging", "sealed", None)])
    finish(ledger, task_id, DONE)

    with caplog.at_level(logging.WARNING, logger="trust_poller.reporter"):
        assert reporter.send_pending(client) is True

    entry = ledger.get(task_id)
    assert entry is not None
    assert entry.state is TaskState.RETIRED
    assert (entry.note or "").startswith(f"{status}:")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(task_id in r.getMessage() and "retired" in r.getMessage() for r in warnings)
    assert reporter.send_pending(client) is True
    assert hub.count("POST", f"/tasks/{task_id}/result") == 1


# --- no answer from the hub: the result is kept ----------------------------------------------


def _hub_json(status: int, detail: str, **headers: str) -> Any:
    body = json.dumps({"detail": detail}).encode()
    reply = (status, {"Content-Type": "application/json", **headers}, body)
    return lambda method, path, _body: reply if path.endswith("/result") else None


FAULTS: dict[str, Callable[[LoopbackHub], None]] = {
    "401": lambda hub: setattr(hub, "override", _hub_json(401, "Invalid API key")),
    "500": lambda hub: hub.refuse_results(500, "Internal Server Error"),
    "503": lambda hub: hub.refuse_results(503, "Service unavailable"),
    "429": lambda hub: setattr(
        hub, "override", _hub_json(429, "Rate limit", **{"Retry-After": "0"})
    ),
    "409 without a status": lambda hub: hub.refuse_results(409, "Conflict"),
    "transport error": lambda hub: hub.set_outage("reset", paths=("/result",)),
    "proxy HTML 403": lambda hub: hub.refuse_results(403, "Forbidden", hub_json=False),
    "proxy HTML 404": lambda hub: hub.refuse_results(404, "Not Found", hub_json=False),
    "proxy HTML 407": lambda hub: hub.refuse_results(407, "Proxy Auth Required", hub_json=False),
    "proxy HTML 413": lambda hub: hub.refuse_results(413, "Too Large", hub_json=False),
    "proxy HTML 502": lambda hub: hub.refuse_results(502, "Bad Gateway", hub_json=False),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_result_is_kept_until_the_hub_itself_answers(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter, fault: str
) -> None:
    task_id = finished_task(hub, client, ledger)
    FAULTS[fault](hub)

    assert reporter.send_pending(client) is False

    assert hub.count("POST", f"/tasks/{task_id}/result") >= 1, "it was tried"
    assert [entry.id for entry in ledger.unsent()] == [task_id]
    assert state_of(ledger, task_id) is TaskState.FINISHED
    assert hub.task(task_id).status == "IN_PROGRESS"

    hub.override = None
    hub.refuse_results(None)
    hub.set_outage(None)
    assert reporter.send_pending(client) is True
    assert hub.task(task_id).status == "COMPLETED"
    assert hub.task(task_id).results_received[-1] == DONE.body()
    assert state_of(ledger, task_id) is TaskState.ACKNOWLEDGED


def test_halt_during_a_send_keeps_the_result(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    task_id = finished_task(hub, client, ledger)
    reporter.halt.set()

    assert reporter.send_pending(client) is False
    assert [entry.id for entry in ledger.unsent()] == [task_id]
    assert hub.count("POST", "/tasks/") == 0


# --- refused bodies ---------------------------------------------------------------------------


def test_too_long_result_refused_with_422_is_replaced_by_a_short_failure(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    task_id = finished_task(hub, client, ledger, Outcome(True, "x" * 10_000_001))

    assert reporter.send_pending(client) is True

    task = hub.task(task_id)
    assert task.status == "FAILED"
    assert len(task.results_received) == 2
    error = json.loads(task.result or "{}")["error"]
    assert REFUSED_MARKER in error
    assert "10000000" in error  # the hub's own reason travels with it
    assert len(task.result or "") < 2000
    stored = ledger.get(task_id)
    assert stored is not None
    assert stored.state is TaskState.ACKNOWLEDGED
    assert stored.outcome is not None
    assert stored.outcome.result == task.result


def test_a_refused_short_failure_is_retired_instead_of_sent_forever(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    task_id = finished_task(hub, client, ledger)
    hub.refuse_results(422, "Input should be a valid string")

    assert reporter.send_pending(client) is True

    assert state_of(ledger, task_id) is TaskState.RETIRED
    bodies = hub.task(task_id).results_received
    assert bodies[0] == DONE.body()
    assert bodies[1]["success"] is False
    assert REFUSED_MARKER in json.loads(bodies[1]["result"])["error"]
    assert len(bodies) == 2


# --- cohort posts -----------------------------------------------------------------------------


def cohort_outcome(hub: LoopbackHub, value: object = "8507") -> tuple[str, Outcome]:
    query_id = str(uuid.uuid4())
    body = {
        "query_id": query_id,
        "trust_id": hub.trust_id,
        "created": "2025-01-02",
        "record_count": 42,
        "data": [{"name": "gender_concept_id", "results": [{"value": value, "count": 20}]}],
        "error": None,
        "suppressed": False,
    }
    return query_id, Outcome(True, None, cohort_post=body)


def test_cohort_post_goes_before_the_task_result(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    query_id, outcome = cohort_outcome(hub)
    task_id = finished_task(hub, client, ledger, outcome)

    assert reporter.send_pending(client) is True

    assert posted_paths(hub) == ["/api/cohort/results", f"/api/tasks/{task_id}/result"]
    assert hub.cohort_results[(query_id, hub.trust_id)] == outcome.cohort_post
    assert hub.task(task_id).status == "COMPLETED"


def test_task_result_waits_until_its_cohort_post_is_delivered(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    query_id, outcome = cohort_outcome(hub)
    task_id = finished_task(hub, client, ledger, outcome)
    hub.set_outage("503", paths=("/cohort/results",))

    assert reporter.send_pending(client) is False
    assert hub.count("POST", f"/tasks/{task_id}/result") == 0
    entry = ledger.get(task_id)
    assert entry is not None
    assert entry.cohort_pending is True

    hub.set_outage(None)
    assert reporter.send_pending(client) is True
    assert posted_paths(hub)[-2:] == ["/api/cohort/results", f"/api/tasks/{task_id}/result"]
    assert (query_id, hub.trust_id) in hub.cohort_results
    assert hub.task(task_id).status == "COMPLETED"


def test_refused_cohort_body_is_replaced_by_an_error_report_and_the_task_fails(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, reporter: Reporter
) -> None:
    query_id, outcome = cohort_outcome(hub, value=8507)  # not a string: the hub answers 422
    task_id = finished_task(hub, client, ledger, outcome)

    assert reporter.send_pending(client) is True

    refused, report = hub.cohort_posts
    assert refused == outcome.cohort_post
    assert report["query_id"] == query_id
    assert report["trust_id"] == hub.trust_id
    assert report["data"] == []
    assert report["record_count"] == 0
    assert report["error"].startswith("422: "), "the hub's reason, as '<status>: <detail>'"
    assert hub.cohort_results[(query_id, hub.trust_id)] == report
    task = hub.task(task_id)
    assert task.status == "FAILED"
    assert "refused the cohort results" in json.loads(task.result or "{}")["error"]
    assert posted_paths(hub)[-1] == f"/api/tasks/{task_id}/result"


# --- pacing -----------------------------------------------------------------------------------


def test_outbox_replay_is_paced_by_the_results_budget(
    hub: LoopbackHub, client: HubClient, kit: Kit, ledger: Ledger
) -> None:
    reporter = make_reporter(kit, ledger, results_per_minute=2)
    for _ in range(3):
        finished_task(hub, client, ledger)
    outcomes: list[object] = []

    def send() -> None:
        sender_client = HubClient(kit, reporter.halt)
        try:
            outcomes.append(reporter.send_pending(sender_client))
        except Halted as halted:
            outcomes.append(halted)
        finally:
            sender_client.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert hub.wait_for(lambda: hub.count("POST", "/tasks/") == 2, timeout=5)
        assert not hub.wait_for(lambda: hub.count("POST", "/tasks/") > 2, timeout=1.0)
    finally:
        reporter.halt.set()
        sender.join(5)
    assert not sender.is_alive(), "a halt ends the wait for the budget at once"
    assert len(outcomes) == 1
    assert len(ledger.unsent()) == 1, "the third result waits for the budget, kept"
