"""Start-up recovery, redelivery and a full disk, on a prepared ledger with the real Daemon."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from trust_poller.errors import EXIT_TEMPORARY
from trust_poller.hub import HubClient
from trust_poller.kit import Kit, load_kit
from trust_poller.ledger import ClaimedTask, Ledger, StateUnwritable, TaskState
from trust_poller.outcome import failure, success
from trust_poller.playground.harness import wait_until
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices
from trust_poller.poller import Daemon
from trust_poller.recovery import MAX_INTERRUPTIONS
from trust_poller.redact import Redactor

KitWriter = Callable[..., Path]
FAST = {
    "POLL_INTERVAL_SECONDS": "0.2",
    "HEARTBEAT_INTERVAL_SECONDS": "0.2",
    "HUB_HEARTBEATS_PER_MINUTE": "6000",
    "HUB_POLLS_PER_MINUTE": "6000",
    "HUB_RESULTS_PER_MINUTE": "6000",
}
CREATE: dict[str, Any] = {
    "project_id": str(uuid.uuid4()),
    "trust_id": "set-per-test",
    "project_name": "Chest CT 2025",
    "query": "SELECT 1",
    "users": [{"id": str(uuid.uuid4()), "email": "ada@example.org", "is_disabled": False}],
}


@pytest.fixture
def kit(write_kit: KitWriter) -> Kit:
    return load_kit(write_kit(**FAST))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


@pytest.fixture
def reopen() -> Iterator[Callable[[Ledger], Ledger]]:
    """Close a ledger and open its state directory again, as a restart does."""
    opened: list[Ledger] = []

    def again(ledger: Ledger) -> Ledger:
        ledger.close()
        opened.append(Ledger.open(ledger.path))
        return opened[-1]

    yield again
    for ledger in opened:
        ledger.close()


@pytest.fixture
def client(kit: Kit) -> Iterator[HubClient]:
    hub_client = HubClient(kit, threading.Event())
    yield hub_client
    hub_client.close()


@pytest.fixture
def make_daemon(kit: Kit) -> Iterator[Callable[[Ledger], Daemon]]:
    """Daemons that are not run, only driven step by step; stopped at teardown."""
    made: list[Daemon] = []

    def make(ledger: Ledger) -> Daemon:
        made.append(Daemon(kit, ledger, Redactor()))
        return made[-1]

    yield make
    for daemon in made:
        daemon.halt.set()
        daemon.pool.close()
        daemon.runner.close()


@pytest.fixture
def daemon(ledger: Ledger, make_daemon: Callable[[Ledger], Daemon]) -> Daemon:
    return make_daemon(ledger)


def record_from_hub(client: HubClient, ledger: Ledger) -> list[str]:
    """Poll the hub and record what it handed out, as a claim does (nothing runs)."""
    _identity, tasks = client.pending_tasks(None)
    ledger.record_claims(
        [ClaimedTask(t.id, t.task_type, str(t.payload), t.created_at) for t in tasks]
    )
    return [task.id for task in tasks]


def error_of(ledger: Ledger, task_id: str) -> str:
    entry = ledger.get(task_id)
    assert entry is not None
    assert entry.outcome is not None
    assert entry.outcome.success is False
    return str(json.loads(entry.outcome.result or "{}")["error"])


def service_calls(services: LoopbackServices, method: str, prefix: str) -> int:
    return sum(1 for c in services.calls if c.method == method and c.path.startswith(prefix))


def test_recover_runs_claimed_reruns_interrupted_and_never_reruns_create_imaging(
    hub: LoopbackHub,
    services: LoopbackServices,
    client: HubClient,
    ledger: Ledger,
    make_daemon: Callable[[Ledger], Daemon],
    reopen: Callable[[Ledger], Ledger],
    caplog: pytest.LogCaptureFixture,
) -> None:
    claimed = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    status = hub.enqueue("get_imaging_status", {"imaging_project_id": "p", "encoded_query": "q"})
    create = hub.enqueue("create_imaging", {**CREATE, "trust_id": hub.trust_id})
    unsent = hub.enqueue("update_user_profile", {"email": "ada@example.org", "enabled": True})
    record_from_hub(client, ledger)
    for started in (status, create, unsent):
        ledger.mark_started(started)
    ledger.mark_finished(unsent, success())

    with caplog.at_level(logging.INFO, logger="trust_poller.ledger"):
        Ledger.open(ledger.path.parent / "empty").close()
        assert caplog.text == "", "an empty state says nothing"
        ledger = reopen(ledger)
    assert (
        f"recovered from {ledger.path}: 1 claimed but not started, 2 interrupted, "
        "1 results unsent" in caplog.text
    )
    daemon = make_daemon(ledger)

    daemon.pool.start()
    daemon.recover()
    assert daemon.pool.wait_idle(10)
    assert service_calls(services, "DELETE", "/projects/") == 1
    assert service_calls(services, "GET", "/retrieval/import_status_count/") == 1
    assert service_calls(services, "POST", "/projects/create") == 0
    assert services.created_projects == {}
    assert service_calls(services, "PUT", "/users") == 0, "a finished task is not run again"
    reason = error_of(ledger, create)
    assert "interrupted" in reason
    assert "'Chest CT 2025'" in reason
    assert CREATE["project_id"] in reason
    assert "may be partly created" in reason
    assert "check XNAT" in reason
    assert hub.count("GET", "/tasks/pending") == 1, "recovery does not ask the hub again"

    assert daemon.reporter.send_pending(client) is True
    assert {task_id: hub.task(task_id).status for task_id in (claimed, status, create, unsent)} == {
        claimed: "COMPLETED",
        status: "COMPLETED",
        create: "FAILED",
        unsent: "COMPLETED",
    }
    assert all(len(task.results_received) == 1 for task in hub.tasks())


def test_task_interrupted_three_times_is_failed_as_poison_instead_of_run_again(
    hub: LoopbackHub,
    services: LoopbackServices,
    client: HubClient,
    ledger: Ledger,
    make_daemon: Callable[[Ledger], Daemon],
) -> None:
    task_id = hub.enqueue("get_imaging_status", {"imaging_project_id": "p", "encoded_query": "q"})
    record_from_hub(client, ledger)
    ledger.mark_started(task_id)
    for start in range(1, MAX_INTERRUPTIONS + 1):
        # A start whose pool never runs the task: the next start finds it interrupted again.
        daemon = make_daemon(ledger)
        daemon.recover()
        entry = ledger.get(task_id)
        assert entry is not None
        assert entry.interruptions == start
        if start < MAX_INTERRUPTIONS:
            assert entry.state is TaskState.STARTED
            assert daemon.pool.waiting == 1, "interrupted fewer than 3 times: run again"

    assert entry is not None
    assert entry.state is TaskState.FINISHED
    assert daemon.pool.waiting == 0
    assert "interrupted 3 times" in error_of(ledger, task_id)
    assert "poison" in error_of(ledger, task_id)
    assert services.calls == []


def test_redelivered_claimed_task_keeps_its_one_entry_and_is_queued_once(
    hub: LoopbackHub, client: HubClient, ledger: Ledger, daemon: Daemon
) -> None:
    task_id = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    assert daemon.claim(client) == 1
    hub.reap(older_than=0)  # the hub re-queued it before it ran

    assert daemon.claim(client) == 1

    assert daemon.pool.waiting == 1
    entry = ledger.get(task_id)
    assert entry is not None
    assert entry.state is TaskState.CLAIMED
    assert entry.deliveries == 2


def test_redelivered_finished_task_gets_its_stored_result_and_never_runs_twice(
    hub: LoopbackHub,
    services: LoopbackServices,
    client: HubClient,
    ledger: Ledger,
    daemon: Daemon,
) -> None:
    task_id = hub.enqueue("create_imaging", {**CREATE, "trust_id": hub.trust_id})
    daemon.pool.start()
    assert daemon.claim(client) == 1
    assert daemon.pool.wait_idle(10)
    hub.reap(older_than=0)  # its result never reached the hub; the hub delivers it again

    assert daemon.claim(client) == 1
    assert daemon.pool.wait_idle(10)
    assert daemon.reporter.send_pending(client) is True

    assert services.created_projects == {CREATE["project_id"]: 1}
    task = hub.task(task_id)
    assert task.status == "COMPLETED"
    assert task.deliveries == 2
    assert json.loads(task.result or "{}")["name"] == "Chest CT 2025"


def test_claim_that_cannot_be_recorded_raises_queues_nothing_and_names_the_stuck_tasks(
    hub: LoopbackHub,
    client: HubClient,
    ledger: Ledger,
    daemon: Daemon,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    disk = Disk(ledger, monkeypatch)
    disk.full.set()

    with pytest.raises(StateUnwritable), caplog.at_level(logging.ERROR):
        daemon.claim(client)

    assert daemon.pool.waiting == 0
    assert ledger.in_state() == []
    assert "1 claimed tasks could not be recorded" in caplog.text


def test_prune_removes_only_settled_entries_and_only_after_48_hours(ledger: Ledger) -> None:
    states = ("claimed", "started", "unsent", "acknowledged", "retired")
    ledger.record_claims([ClaimedTask(name, "delete_imaging", "sealed", None) for name in states])
    for name in states[1:]:
        ledger.mark_started(name)
    for name in states[2:]:
        ledger.mark_finished(name, failure("x"))
    ledger.mark_acknowledged("acknowledged")
    ledger.mark_retired("retired", "409: already COMPLETED")
    now = time.time()

    assert ledger.prune(now=now + 47 * 3600) == 0
    assert ledger.prune(now=now + 49 * 3600) == 2

    assert [entry.id for entry in ledger.in_state()] == ["claimed", "started", "unsent"]
    assert [entry.id for entry in ledger.unsent()] == ["unsent"]


# --- a full disk ------------------------------------------------------------------------------


class Disk:
    """Makes every write of one ledger fail as a full disk does, while `full` is set."""

    def __init__(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = threading.Event()
        real = Ledger._using

        def using(owner: Ledger, write: bool) -> AbstractContextManager[Any]:
            if write and owner is ledger and self.full.is_set():
                raise StateUnwritable(
                    f"state directory {owner.path} cannot be written: database or disk is full"
                )
            return real(owner, write)

        monkeypatch.setattr(Ledger, "_using", using)


def test_full_disk_stops_claiming_keeps_heartbeating_says_so_and_recovers(
    hub: LoopbackHub,
    services: LoopbackServices,
    ledger: Ledger,
    daemon: Daemon,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = Disk(ledger, monkeypatch)
    caplog.set_level(logging.INFO)
    runner = threading.Thread(target=daemon.run, name="daemon-under-test")
    runner.start()
    try:
        before = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
        assert wait_until(lambda: hub.task(before).status == "COMPLETED", 10)

        disk.full.set()
        assert wait_until(lambda: "claiming is stopped until it can" in caplog.text, 10)
        during = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
        polls, beats = hub.count("GET", "/tasks/pending"), len(hub.heartbeats)
        time.sleep(1.5)
        assert hub.count("GET", "/tasks/pending") <= polls + 1  # at most one already on its way
        assert hub.task(during).status == "PENDING", "nothing is claimed that cannot be recorded"
        assert len(hub.heartbeats) >= beats + 4, "heartbeats go on"
        assert "STATE UNWRITABLE" in daemon.status_line()
        loud = [r for r in caplog.records if "claiming is stopped" in r.getMessage()]
        assert loud[0].levelno == logging.ERROR
        assert str(ledger.path) in loud[0].getMessage()

        disk.full.clear()
        assert wait_until(lambda: hub.task(during).status == "COMPLETED", 10)
        assert "state directory writable again" in caplog.text
    finally:
        daemon.request_stop()
        runner.join(15)
    assert not runner.is_alive()
    assert service_calls(services, "DELETE", "/projects/") == 2


def test_once_on_a_full_disk_exits_75_before_it_starts_or_claims_anything(
    hub: LoopbackHub,
    services: LoopbackServices,
    client: HubClient,
    ledger: Ledger,
    daemon: Daemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waiting = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    record_from_hub(client, ledger)
    fresh = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    ledger.store_trust_id(hub.trust_id)
    Disk(ledger, monkeypatch).full.set()

    with pytest.raises(StateUnwritable) as refused:
        daemon.once()

    assert refused.value.exit_code == EXIT_TEMPORARY
    assert str(ledger.path) in str(refused.value)
    entry = ledger.get(waiting)
    assert entry is not None
    assert entry.state is TaskState.CLAIMED, "not started, so never cut off"
    assert hub.task(fresh).status == "PENDING"
    assert service_calls(services, "DELETE", "/projects/") == 0
