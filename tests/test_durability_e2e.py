"""Never lose a result, never run a task twice: the real CLI, killed and restarted.

The loopback hub's re-queue is off (its default), so nothing here is rescued by the hub:
every task must end COMPLETED or FAILED through trust-poller's own state directory.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from trust_poller.playground.demo import demo_payloads
from trust_poller.playground.harness import Daemon, run_cli, wait_until
from trust_poller.playground.http_server import RawReply
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices

KitWriter = Callable[..., Path]
StartDaemon = Callable[..., Daemon]
FAST = {
    "POLL_INTERVAL_SECONDS": "0.2",
    "HEARTBEAT_INTERVAL_SECONDS": "0.2",
    "HUB_HEARTBEATS_PER_MINUTE": "6000",
    "HUB_POLLS_PER_MINUTE": "6000",
    "HUB_RESULTS_PER_MINUTE": "6000",
    "DRAIN_TIMEOUT_SECONDS": "5",
}
FINAL = ("COMPLETED", "FAILED")
STATUS_PATH = "/retrieval/import_status_count/"
CREATE_PATH = "/projects/create-project-from-central-hub-project"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def fast_kit(write_kit: KitWriter, **overrides: str | None) -> Path:
    return write_kit(**{**FAST, **overrides})


def create_payload(hub: LoopbackHub, name: str, email: str) -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "trust_id": hub.trust_id,
        "project_name": name,
        "query": "SELECT person_id FROM person",
        "users": [{"id": str(uuid.uuid4()), "email": email, "is_disabled": False}],
    }


def status_payload() -> dict[str, Any]:
    return {"imaging_project_id": str(uuid.uuid4()), "encoded_query": "cT0x"}


def ledger_states(state_dir: Path) -> dict[str, str]:
    """Each task's state, read as an operator would, while the daemon holds the directory."""
    database = state_dir / "state.db"
    if not database.exists():
        return {}
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute("SELECT id, state FROM tasks").fetchall()
        except sqlite3.OperationalError:  # not created yet: the daemon is still starting
            return {}
    return {str(task_id): str(state) for task_id, state in rows}


def calls_to(services: LoopbackServices, method: str, prefix: str) -> list[Any]:
    return [c for c in services.calls if c.method == method and c.path.startswith(prefix)]


def in_flight(services: LoopbackServices, method: str, prefix: str) -> bool:
    return any(c.finished_at is None for c in calls_to(services, method, prefix))


def created_for(services: LoopbackServices, payload: dict[str, Any]) -> int:
    project_id = payload["project_id"]
    return sum(
        1 for c in calls_to(services, "POST", CREATE_PATH) if c.body["project_id"] == project_id
    )


def all_final(hub: LoopbackHub, ids: list[str]) -> bool:
    return all(hub.task(task_id).status in FINAL for task_id in ids)


def error_of(hub: LoopbackHub, task_id: str) -> str:
    task = hub.task(task_id)
    assert task.status == "FAILED", (task.status, task.result)
    return str(json.loads(task.result or "{}")["error"])


def recovered(claimed: int, interrupted: int, unsent: int) -> str:
    return (
        rf"recovered from \S+: {claimed} claimed but not started, {interrupted} interrupted, "
        rf"{unsent} results unsent"
    )


def assert_each_result_posted_once(hub: LoopbackHub, ids: list[str]) -> None:
    for task_id in ids:
        task = hub.task(task_id)
        assert task.deliveries == 1, "the hub never handed it out again"
        assert len(task.results_received) == 1, (task_id, task.results_received)


# --- kill -9 at each point ---------------------------------------------------------------------


def test_kill_9_after_the_claim_and_during_handlers_loses_nothing_and_never_creates_twice(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
) -> None:
    kit = fast_kit(write_kit, MAX_CONCURRENT_TASKS="2")
    services.set_delay(CREATE_PATH, 2)
    services.set_delay(STATUS_PATH, 30)
    interrupted_create = create_payload(hub, "Chest CT A", "a@example.org")
    waiting_create = create_payload(hub, "Chest CT B", "b@example.org")
    create_a = hub.enqueue("create_imaging", interrupted_create)
    status = hub.enqueue("get_imaging_status", status_payload())
    create_b = hub.enqueue("create_imaging", waiting_create)
    delete = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    user = hub.enqueue("update_user_profile", {"email": "c@example.org", "enabled": False})
    ids = [create_a, status, create_b, delete, user]

    first = start_daemon(kit)
    assert wait_until(
        lambda: in_flight(services, "POST", CREATE_PATH) and in_flight(services, "GET", STATUS_PATH)
    )
    assert all(hub.task(task_id).status == "IN_PROGRESS" for task_id in ids), "all claimed"
    first.kill9()
    services.set_delay(CREATE_PATH, 0)
    services.set_delay(STATUS_PATH, 0)

    second = start_daemon(kit)
    assert wait_until(lambda: all_final(hub, ids), 20), [t.status for t in hub.tasks()]
    assert second.wait_for_log(recovered(claimed=3, interrupted=2, unsent=0))
    assert second.stop() == 0

    reason = error_of(hub, create_a)
    assert "interrupted" in reason
    assert "may be partly created" in reason
    assert "'Chest CT A'" in reason
    assert "check XNAT" in reason
    assert created_for(services, interrupted_create) == 1, "never re-run"
    assert created_for(services, waiting_create) == 1
    assert wait_until(lambda: services.created_projects.get(interrupted_create["project_id"]), 5)
    assert set(services.created_projects.values()) == {1}
    assert hub.task(create_b).status == "COMPLETED"
    assert json.loads(hub.task(create_b).result or "{}")["name"] == "Chest CT B"
    assert hub.task(status).status == "COMPLETED", "safe to repeat: run again"
    assert len(calls_to(services, "GET", STATUS_PATH)) == 2
    assert hub.task(delete).status == hub.task(user).status == "COMPLETED"
    assert_each_result_posted_once(hub, ids)


def test_kill_9_after_the_handlers_before_the_report_sends_the_kept_results_after_restart(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    state_dir: Path,
) -> None:
    kit = fast_kit(write_kit)
    project = create_payload(hub, "Chest CT", "a@example.org")
    ids = [
        hub.enqueue("create_imaging", project),
        hub.enqueue("get_imaging_status", status_payload()),
        hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())}),
    ]
    hub.refuse_results(503, "Service unavailable")

    first = start_daemon(kit)
    assert wait_until(lambda: list(ledger_states(state_dir).values()) == ["finished"] * 3)
    assert wait_until(lambda: hub.count("POST", "/tasks/") >= 1), "a report was under way"
    first.kill9()
    with closing(sqlite3.connect(state_dir / "state.db")) as db:
        envelopes = dict(db.execute("SELECT id, envelope FROM tasks").fetchall())
    assert envelopes == {task_id: hub.task(task_id).payload for task_id in ids}, "kept sealed"
    hub.refuse_results(None)

    second = start_daemon(kit)
    assert wait_until(lambda: all_final(hub, ids), 20)
    assert second.wait_for_log(recovered(claimed=0, interrupted=0, unsent=3))
    assert second.stop() == 0

    assert all(hub.task(task_id).status == "COMPLETED" for task_id in ids)
    assert json.loads(hub.task(ids[0]).result or "{}")["name"] == "Chest CT", "the stored result"
    assert services.created_projects == {project["project_id"]: 1}
    assert len(calls_to(services, "GET", STATUS_PATH)) == 1
    assert len(calls_to(services, "DELETE", "/projects/")) == 1
    assert set(ledger_states(state_dir).values()) == {"acknowledged"}


def test_kill_9_during_a_hub_outage_resends_only_after_the_identity_check(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    state_dir: Path,
) -> None:
    kit = fast_kit(write_kit)
    services.set_delay("/retrieval/reimport", 1)
    services.set_delay(CREATE_PATH, 1)
    ids = [
        hub.enqueue("reimport_studies", status_payload()),
        hub.enqueue("create_imaging", create_payload(hub, "Chest CT", "a@example.org")),
    ]

    first = start_daemon(kit)
    assert wait_until(lambda: len(ledger_states(state_dir)) == 2)
    hub.set_outage("reset")
    assert wait_until(lambda: list(ledger_states(state_dir).values()) == ["finished"] * 2), (
        ledger_states(state_dir),
        first.log,
    )
    assert first.wait_for_log("hub unreachable since")
    first.kill9()

    posts_before = hub.count("POST", "/tasks/")
    second = start_daemon(kit)
    assert second.wait_for_log("hub unreachable since")
    time.sleep(1)
    assert hub.count("POST", "/tasks/") == posts_before, "nothing re-sent before a heartbeat"
    hub.set_outage(None)

    assert wait_until(lambda: all_final(hub, ids), 20)
    assert second.wait_for_log(recovered(claimed=0, interrupted=0, unsent=2))
    assert second.stop() == 0
    assert all(hub.task(task_id).status == "COMPLETED" for task_id in ids)
    assert len(calls_to(services, "PUT", "/retrieval/reimport")) == 1
    assert set(services.created_projects.values()) == {1}


@pytest.fixture
def hanging_cohort_post(hub: LoopbackHub) -> Iterator[threading.Event]:
    """While the returned event is set, /cohort/results posts hang; the reply never comes."""
    hanging, release = threading.Event(), threading.Event()

    def hook(method: str, path: str, _body: bytes) -> RawReply | None:
        if path.endswith("/cohort/results") and hanging.is_set():
            release.wait(30)
            return 503, JSON, b'{"detail": "gone"}'
        return None

    hub.override = hook
    hanging.set()
    try:
        yield hanging
    finally:
        release.set()


def test_kill_9_during_the_cohort_post_reposts_it_before_the_result_without_rerunning(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    hanging_cohort_post: threading.Event,
) -> None:
    kit = fast_kit(write_kit)
    payload = dict(demo_payloads(hub))["cohort_query"]
    task_id = hub.enqueue("cohort_query", payload)

    first = start_daemon(kit)
    assert wait_until(lambda: hub.count("POST", "/cohort/results") == 1)
    first.kill9()
    hanging_cohort_post.clear()
    restart_at = time.monotonic()

    second = start_daemon(kit)
    assert wait_until(lambda: hub.task(task_id).status in FINAL, 20)
    assert second.wait_for_log(recovered(claimed=0, interrupted=0, unsent=1))
    assert second.stop() == 0

    assert hub.task(task_id).status == "COMPLETED"
    assert len(calls_to(services, "POST", "/cohort")) == 1, "the query ran once"
    stored = hub.cohort_results[(payload["query_id"], hub.trust_id)]
    assert stored["record_count"] == 42
    assert all(isinstance(r["value"], str) for field in stored["data"] for r in field["results"])
    after = [
        r.route
        for r in hub.requests_log
        if r.at > restart_at and r.method == "POST" and "heartbeat" not in r.route
    ]
    assert after == ["/api/cohort/results", f"/api/tasks/{task_id}/result"]


def test_task_interrupted_three_times_is_reported_as_poison(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
) -> None:
    kit = fast_kit(write_kit)
    services.set_delay(STATUS_PATH, 30)
    task_id = hub.enqueue("get_imaging_status", status_payload())
    for attempt in range(1, 4):
        daemon = start_daemon(kit)

        def reached(n: int = attempt) -> bool:
            return len(calls_to(services, "GET", STATUS_PATH)) == n

        assert wait_until(reached)
        daemon.kill9()
    services.set_delay(STATUS_PATH, 0)

    last = start_daemon(kit)
    assert wait_until(lambda: hub.task(task_id).status in FINAL, 20)
    assert last.stop() == 0

    reason = error_of(hub, task_id)
    assert "interrupted 3 times" in reason
    assert "poison" in reason
    assert len(calls_to(services, "GET", STATUS_PATH)) == 3, "not run a fourth time"


# --- a hub that refuses results for a long time ------------------------------------------------


def test_results_refused_for_a_long_time_are_each_accepted_exactly_once_after_recovery(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    state_dir: Path,
) -> None:
    refusing = threading.Event()
    refused: list[str] = []
    accepted: dict[str, int] = {}
    lock = threading.Lock()

    def hook(method: str, path: str, _body: bytes) -> RawReply | None:
        if method != "POST" or not path.endswith("/result"):
            return None
        task_id = path.split("/")[-2]
        with lock:
            if refusing.is_set():
                refused.append(task_id)
                return 503, JSON, b'{"detail": "Service unavailable"}'
            accepted[task_id] = accepted.get(task_id, 0) + 1
        return None

    hub.override = hook
    refusing.set()
    ids = [hub.enqueue(task_type, payload) for task_type, payload in demo_payloads(hub)]
    daemon = start_daemon(fast_kit(write_kit))
    assert wait_until(lambda: len(ledger_states(state_dir)) == len(ids))
    assert wait_until(lambda: set(ledger_states(state_dir).values()) == {"finished"}, 20)

    time.sleep(8)  # the outage, compressed: minutes of refusals, with backoff scaled down
    assert daemon.process.poll() is None
    assert set(ledger_states(state_dir).values()) == {"finished"}, "every result is kept"
    assert all(hub.task(task_id).status == "IN_PROGRESS" for task_id in ids)
    refusing.clear()

    assert wait_until(lambda: all_final(hub, ids), 30)
    assert daemon.wait_for_log("hub reachable again")
    assert daemon.stop() == 0
    assert accepted == dict.fromkeys(ids, 1)
    assert all(hub.task(task_id).status == "COMPLETED" for task_id in ids)
    assert 3 <= len(refused) <= 30, "retried with backoff, not hammered"
    assert daemon.log.count("hub unreachable since") == 1, "one line per outage, not per try"


# --- graceful drain ------------------------------------------------------------------------------


def test_first_sigterm_drains_heartbeating_reports_the_running_task_and_exits_0(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
) -> None:
    kit = fast_kit(write_kit, MAX_CONCURRENT_TASKS="1", DRAIN_TIMEOUT_SECONDS="10")
    services.set_delay(STATUS_PATH, 2)
    running = hub.enqueue("get_imaging_status", status_payload())
    queued = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    daemon = start_daemon(kit)
    assert wait_until(lambda: in_flight(services, "GET", STATUS_PATH))

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_for_log("stopping: waiting up to 10 s for 1 running tasks")
    stopping_at = time.monotonic()
    polls = hub.count("GET", "/tasks/pending")

    assert daemon.wait(20) == 0
    assert hub.task(running).status == "COMPLETED", "finished within the drain and reported"
    assert sum(beat.at > stopping_at for beat in hub.heartbeats) >= 3, "heartbeats go on"
    assert hub.count("GET", "/tasks/pending") == polls, "no claim after the signal"
    assert hub.task(queued).status == "IN_PROGRESS"
    assert calls_to(services, "DELETE", "/projects/") == [], "queued: not started"

    again = start_daemon(kit)
    assert wait_until(lambda: hub.task(queued).status == "COMPLETED", 20)
    assert again.wait_for_log(recovered(claimed=1, interrupted=0, unsent=0))
    assert again.stop() == 0
    assert len(calls_to(services, "GET", STATUS_PATH)) == 1


def test_handler_still_running_at_the_drain_deadline_stays_started_for_the_next_start(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    state_dir: Path,
) -> None:
    kit = fast_kit(write_kit, DRAIN_TIMEOUT_SECONDS="1")
    services.set_delay(STATUS_PATH, 30)
    task_id = hub.enqueue("get_imaging_status", status_payload())
    daemon = start_daemon(kit)
    assert wait_until(lambda: in_flight(services, "GET", STATUS_PATH))

    signalled_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert time.monotonic() - signalled_at < 3
    assert "still running at the drain deadline" in daemon.log
    assert ledger_states(state_dir) == {task_id: "started"}
    assert hub.task(task_id).status == "IN_PROGRESS"

    services.set_delay(STATUS_PATH, 0)
    again = start_daemon(kit)
    assert wait_until(lambda: hub.task(task_id).status == "COMPLETED", 20)
    assert again.wait_for_log(recovered(claimed=0, interrupted=1, unsent=0))
    assert again.stop() == 0


def test_second_signal_exits_at_once_and_keeps_the_state(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    state_dir: Path,
) -> None:
    kit = fast_kit(write_kit, DRAIN_TIMEOUT_SECONDS="30")
    services.set_delay(STATUS_PATH, 30)
    task_id = hub.enqueue("get_imaging_status", status_payload())
    daemon = start_daemon(kit)
    assert wait_until(lambda: in_flight(services, "GET", STATUS_PATH))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_for_log("stopping: waiting up to 30 s")

    signalled_at = time.monotonic()
    daemon.signal(signal.SIGINT)
    assert daemon.wait(5) == 0
    assert time.monotonic() - signalled_at < 2
    assert ledger_states(state_dir) == {task_id: "started"}


# --- the state directory -------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_dir_is_private_and_held_by_one_poller_at_a_time(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon, state_dir: Path
) -> None:
    kit = fast_kit(write_kit)
    hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    daemon = start_daemon(kit)
    assert wait_until(lambda: set(ledger_states(state_dir).values()) == {"acknowledged"})

    assert mode(state_dir) == 0o700
    files = sorted(path.name for path in state_dir.iterdir())
    assert {"lock", "state.db"} <= set(files)
    assert {name: mode(state_dir / name) for name in files} == dict.fromkeys(files, 0o600)

    for command in ("once", "run"):
        second = run_cli(command, "--kit", str(kit), "--state-dir", str(state_dir), timeout=20)
        assert second.returncode == 75, (command, second.stderr)
        assert f"pid {daemon.process.pid}" in second.stderr
        assert str(state_dir) in second.stderr
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_unusable_state_dir_exits_78_naming_the_path(write_kit: KitWriter, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    unusable = blocker / "state"
    for command in ("once", "run"):
        done = run_cli(command, "--kit", str(write_kit()), "--state-dir", str(unusable))
        assert done.returncode == 78, (command, done.stderr)
        assert str(unusable) in done.stderr
        assert "Traceback" not in done.stderr


# --- identity and `once` --------------------------------------------------------------------------


def test_once_keeps_undelivered_results_lists_them_and_exits_75(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, state_dir: Path
) -> None:
    kit = fast_kit(write_kit)
    ids = [hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})]
    hub.refuse_results(502, "Bad Gateway", hub_json=False)

    kept = run_cli("once", "--kit", str(kit), "--state-dir", str(state_dir))

    assert kept.returncode == 75, kept.stderr
    assert f"{ids[0]}" in kept.stdout
    assert "kept for later" in kept.stdout
    assert "1 results could not be delivered" in kept.stderr
    assert hub.task(ids[0]).status == "IN_PROGRESS"

    hub.refuse_results(None)
    sent = run_cli("once", "--kit", str(kit), "--state-dir", str(state_dir))
    assert sent.returncode == 0, sent.stderr
    assert ids[0] in sent.stdout, "a result from an earlier run is listed when it is sent"
    assert "reported" in sent.stdout
    assert hub.task(ids[0]).status == "COMPLETED"
    assert len(calls_to(services, "DELETE", "/projects/")) == 1


def test_a_start_meeting_another_trust_exits_78_and_leaves_the_outbox_untouched(
    hub: LoopbackHub,
    write_kit: KitWriter,
    start_daemon: StartDaemon,
    state_dir: Path,
) -> None:
    kit = fast_kit(write_kit, EXPECTED_TRUST_ID=None)
    task_id = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    hub.refuse_results(503, "Service unavailable")
    first = start_daemon(kit)
    assert wait_until(lambda: ledger_states(state_dir) == {task_id: "finished"})
    first.kill9()
    hub.refuse_results(None)
    with closing(sqlite3.connect(state_dir / "state.db")) as db:
        stored = db.execute("SELECT value FROM meta WHERE key = 'trust_id'").fetchone()
    assert stored == (hub.trust_id,), "the trust id the identity check passed with is stored"

    other = str(uuid.uuid4())
    hub.identity_override(other)
    posts, polls = hub.count("POST", "/tasks/"), hub.count("GET", "/tasks/pending")
    stranger = start_daemon(kit)
    assert stranger.wait(20) == 78
    assert "IDENTITY MISMATCH" in stranger.log
    assert other in stranger.log
    assert hub.trust_id in stranger.log
    expected_other = run_cli(
        "once", "--kit", str(fast_kit(write_kit)), "--state-dir", str(state_dir)
    )
    assert expected_other.returncode == 78
    assert hub.count("POST", "/tasks/") == posts, "nothing re-sent under another trust"
    assert hub.count("GET", "/tasks/pending") == polls, "nor claimed"
    assert ledger_states(state_dir) == {task_id: "finished"}

    hub.identity_override(None)
    back = start_daemon(kit)
    assert wait_until(lambda: hub.task(task_id).status == "COMPLETED", 20)
    assert back.stop() == 0
