"""The task ledger: lifecycle, redelivery, outbox order, durability, locking and damage."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from trust_poller import ledger as ledger_module
from trust_poller.errors import StateError, StateLocked
from trust_poller.ledger import (
    FORMAT_VERSION,
    ClaimedTask,
    Ledger,
    StateUnwritable,
    TaskState,
    TransitionRefused,
    UnknownTask,
    default_state_dir,
)
from trust_poller.outcome import Outcome, failure

COHORT_POST = {"query_id": "q-1", "record_count": 3, "data": []}


def claim(task_id: str, task_type: str = "echo") -> ClaimedTask:
    return ClaimedTask(task_id, task_type, f"sealed-envelope-of-{task_id}", "2025-01-01T00:00:00Z")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_db(state_dir: Path) -> sqlite3.Connection:
    """A second connection, as an operator with the sqlite3 shell would have."""
    return sqlite3.connect(state_dir / "state.db", isolation_level=None)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def ledger(state_dir: Path) -> Iterator[Ledger]:
    opened = Ledger.open(state_dir)
    yield opened
    opened.close()


def test_task_goes_claimed_started_finished_acknowledged(ledger: Ledger) -> None:
    assert ledger.record_claims([claim("t1")]) == {"t1": None}
    entry = ledger.get("t1")
    assert entry is not None
    assert (entry.state, entry.deliveries, entry.outcome, entry.interruptions) == (
        TaskState.CLAIMED,
        1,
        None,
        0,
    )
    assert entry.envelope == "sealed-envelope-of-t1"
    assert entry.task_type == "echo"

    ledger.mark_started("t1")
    assert ledger.in_state(TaskState.STARTED)[0].id == "t1"

    ledger.mark_finished("t1", Outcome(True, '{"ok": 1}'))
    finished = ledger.get("t1")
    assert finished is not None
    assert finished.state is TaskState.FINISHED
    assert finished.outcome == Outcome(True, '{"ok": 1}', None)
    assert not finished.cohort_pending
    assert [e.id for e in ledger.unsent()] == ["t1"]

    ledger.mark_acknowledged("t1")
    done = ledger.get("t1")
    assert done is not None
    assert done.state is TaskState.ACKNOWLEDGED
    assert done.outcome == Outcome(True, '{"ok": 1}', None)
    assert ledger.unsent() == []
    assert done.updated_at >= done.claimed_at


def test_redelivered_task_returns_existing_entry_and_changes_only_deliveries(
    ledger: Ledger,
) -> None:
    ledger.record_claims([claim("t1")])
    ledger.mark_started("t1")
    ledger.mark_finished("t1", failure("boom"))
    before = ledger.get("t1")
    assert before is not None

    claims = ledger.record_claims([ClaimedTask("t1", "other", "a-new-envelope"), claim("t2")])

    assert claims["t2"] is None
    redelivered = claims["t1"]
    assert redelivered is not None
    assert redelivered.deliveries == 2
    after = ledger.get("t1")
    assert after == redelivered
    assert after.__dict__ | {"deliveries": 1} == before.__dict__


def test_duplicate_id_in_one_claim_batch_is_one_new_task(ledger: Ledger) -> None:
    assert ledger.record_claims([claim("t1"), claim("t1")]) == {"t1": None}
    entry = ledger.get("t1")
    assert entry is not None
    assert entry.deliveries == 1


def test_claim_order_is_kept(ledger: Ledger) -> None:
    ledger.record_claims([claim(name) for name in ("c", "a", "b")])
    ledger.record_claims([claim("d")])
    assert [e.id for e in ledger.in_state(TaskState.CLAIMED)] == ["c", "a", "b", "d"]
    assert [e.id for e in ledger.in_state()] == ["c", "a", "b", "d"]


def test_unsent_is_in_finish_order_and_skips_tasks_awaiting_redelivery(ledger: Ledger) -> None:
    ledger.record_claims([claim(name) for name in ("a", "b", "c", "d")])
    for name in ("c", "a", "d", "b"):
        ledger.mark_started(name)
        ledger.mark_finished(name, Outcome(True, name))
    assert [e.id for e in ledger.unsent()] == ["c", "a", "d", "b"]

    ledger.set_awaiting_redelivery("a", True)
    assert [e.id for e in ledger.unsent()] == ["c", "d", "b"]
    waiting = ledger.get("a")
    assert waiting is not None
    assert waiting.awaiting_redelivery
    assert waiting.outcome == Outcome(True, "a")

    ledger.set_awaiting_redelivery("a", False)
    assert [e.id for e in ledger.unsent()] == ["c", "a", "d", "b"]


def test_replacing_an_outcome_keeps_its_place_in_the_outbox(ledger: Ledger) -> None:
    ledger.record_claims([claim("a"), claim("b")])
    ledger.mark_finished("a", Outcome(True, "x" * 100))
    ledger.mark_finished("b", Outcome(True, "b"))
    ledger.replace_outcome("a", failure("result too large"), cohort_pending=False)
    assert [e.id for e in ledger.unsent()] == ["a", "b"]
    replaced = ledger.get("a")
    assert replaced is not None
    assert replaced.outcome == failure("result too large")


def test_cohort_post_is_pending_until_delivered_and_kept_after(ledger: Ledger) -> None:
    ledger.record_claims([claim("q", "cohort_query")])
    ledger.mark_started("q")
    ledger.mark_finished("q", Outcome(True, "{}", COHORT_POST))
    entry = ledger.get("q")
    assert entry is not None
    assert entry.cohort_pending
    assert entry.outcome is not None
    assert entry.outcome.cohort_post == COHORT_POST

    ledger.mark_cohort_delivered("q")
    delivered = ledger.get("q")
    assert delivered is not None
    assert not delivered.cohort_pending
    assert delivered.outcome == Outcome(True, "{}", COHORT_POST)


def test_retired_task_keeps_its_note_and_leaves_the_outbox(ledger: Ledger) -> None:
    ledger.record_claims([claim("t1")])
    ledger.mark_finished("t1", Outcome(False, "{}"))
    ledger.mark_retired("t1", "hub: 409 status COMPLETED")
    entry = ledger.get("t1")
    assert entry is not None
    assert (entry.state, entry.note) == (TaskState.RETIRED, "hub: 409 status COMPLETED")
    assert ledger.unsent() == []


def test_started_task_may_restart_but_finished_task_never_runs_again(ledger: Ledger) -> None:
    ledger.record_claims([claim("t1")])
    ledger.mark_started("t1")
    ledger.mark_started("t1")
    assert ledger.note_interrupted("t1") == 1
    assert ledger.note_interrupted("t1") == 2
    ledger.mark_finished("t1", Outcome(True, None))
    with pytest.raises(TransitionRefused, match="t1 is finished"):
        ledger.mark_started("t1")
    ledger.mark_acknowledged("t1")
    with pytest.raises(TransitionRefused, match="t1 is acknowledged"):
        ledger.mark_started("t1")
    with pytest.raises(TransitionRefused):
        ledger.mark_retired("t1", "late refusal")
    entry = ledger.get("t1")
    assert entry is not None
    assert (entry.state, entry.interruptions) == (TaskState.ACKNOWLEDGED, 2)
    assert entry.outcome == Outcome(True, None)


def test_a_redelivered_acknowledged_task_can_put_its_result_back_in_the_outbox(
    ledger: Ledger,
) -> None:
    ledger.record_claims([claim("a"), claim("b")])
    ledger.mark_finished("a", Outcome(True, "a", COHORT_POST))
    ledger.mark_cohort_delivered("a")
    ledger.mark_acknowledged("a")
    ledger.mark_finished("b", Outcome(True, "b"))

    ledger.mark_finished("a", Outcome(True, "a", COHORT_POST))

    assert [e.id for e in ledger.unsent()] == ["b", "a"]
    again = ledger.get("a")
    assert again is not None
    assert (again.state, again.cohort_pending) == (TaskState.FINISHED, True)


def test_changing_an_unknown_task_raises(ledger: Ledger) -> None:
    with pytest.raises(UnknownTask, match="nope"):
        ledger.mark_started("nope")
    assert ledger.get("nope") is None


def test_prune_removes_only_old_acknowledged_and_retired_entries(ledger: Ledger) -> None:
    ledger.record_claims([claim(name) for name in ("ack", "ret", "fin", "new", "claimed")])
    for name in ("ack", "ret", "fin", "new"):
        ledger.mark_finished(name, Outcome(True, name))
    ledger.mark_acknowledged("ack")
    ledger.mark_retired("ret", "404")
    ledger.mark_acknowledged("new")
    with closing(raw_db(ledger.path)) as db:
        db.execute("UPDATE tasks SET updated_at = updated_at - 49 * 3600 WHERE id != 'new'")

    assert ledger.prune() == 2
    assert {e.id for e in ledger.in_state()} == {"fin", "new", "claimed"}
    assert ledger.prune() == 0
    recent = ledger.get("new")
    assert recent is not None
    assert ledger.prune(now=recent.updated_at + 3601, keep_seconds=3600) == 1


def test_counts_per_state_and_unsent(ledger: Ledger) -> None:
    ledger.record_claims([claim(name) for name in "abcdef"])
    ledger.mark_started("b")
    for name in "cdef":
        ledger.mark_finished(name, Outcome(True, name))
    ledger.set_awaiting_redelivery("d", True)
    ledger.mark_acknowledged("e")
    ledger.mark_retired("f", "403")
    assert ledger.counts() == {
        "claimed": 1,
        "started": 1,
        "finished": 2,
        "acknowledged": 1,
        "retired": 1,
        "unsent": 1,
        "quarantined": 0,
    }


def test_trust_id_is_stored(ledger: Ledger) -> None:
    assert ledger.stored_trust_id() is None
    ledger.store_trust_id("0b7c-trust")
    ledger.store_trust_id("1a2b-trust")
    assert ledger.stored_trust_id() == "1a2b-trust"
    ledger.check_writable()


def test_state_dir_is_created_0700_with_files_0600(tmp_path: Path) -> None:
    state_dir = tmp_path / "deep" / "state"
    previous = os.umask(0o022)
    try:
        with Ledger.open(state_dir) as opened:
            opened.record_claims([claim("t1")])
            assert os.umask(0o022) == 0o022  # open() put the umask back
            assert mode(state_dir) == 0o700
            for name in ("state.db", "state.db-wal", "state.db-shm", "lock"):
                assert mode(state_dir / name) == 0o600, name
            assert (state_dir / "lock").read_text().strip() == str(os.getpid())
    finally:
        os.umask(previous)


def test_loose_modes_on_existing_files_are_tightened(state_dir: Path) -> None:
    with Ledger.open(state_dir):
        pass
    for name in ("state.db", "lock"):
        (state_dir / name).chmod(0o644)
    with Ledger.open(state_dir):
        assert mode(state_dir / "state.db") == 0o600
        assert mode(state_dir / "lock") == 0o600


SECOND_OPEN = """
import sys
from pathlib import Path
from trust_poller.errors import StateLocked
from trust_poller.ledger import Ledger
try:
    Ledger.open(Path(sys.argv[1]))
except StateLocked as error:
    print(error)
    sys.exit(75)
"""


def test_second_poller_in_another_process_is_refused_naming_the_holder(ledger: Ledger) -> None:
    second = subprocess.run(
        [sys.executable, "-c", SECOND_OPEN, str(ledger.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 75, second.stderr
    assert f"another trust-poller (pid {os.getpid()}) holds the state directory" in second.stdout
    assert str(ledger.path) in second.stdout
    assert "run only one per kit" in second.stdout


def test_second_open_in_the_same_process_is_refused(ledger: Ledger) -> None:
    with pytest.raises(StateLocked, match=f"pid {os.getpid()}"):
        Ledger.open(ledger.path)
    ledger.record_claims([claim("still-works")])


def test_reopening_after_close_keeps_everything(state_dir: Path) -> None:
    with Ledger.open(state_dir) as first:
        first.record_claims([claim("a"), claim("b"), claim("q")])
        first.mark_started("a")
        first.mark_finished("b", Outcome(False, "{}"))
        first.mark_finished("q", Outcome(True, "{}", COHORT_POST))
        first.set_awaiting_redelivery("b", True)
        first.store_trust_id("trust-1")
        before = first.in_state()
    with Ledger.open(state_dir) as second:
        assert second.in_state() == before
        assert second.stored_trust_id() == "trust-1"
        assert second.record_claims([claim("b")])["b"] is not None


def test_a_state_db_that_is_not_a_database_is_moved_aside(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir.mkdir(mode=0o700)
    garbage = b"this is not an sqlite database\n" * 200
    (state_dir / "state.db").write_bytes(garbage)

    with caplog.at_level(logging.ERROR), Ledger.open(state_dir) as opened:
        assert opened.record_claims([claim("t1")]) == {"t1": None}

    [aside] = state_dir.glob("state.db.corrupt-*")
    assert aside.read_bytes() == garbage
    assert str(aside) in caplog.text
    assert str(state_dir / "state.db") in caplog.text
    with Ledger.open(state_dir) as reopened:
        assert reopened.get("t1") is not None


def test_a_wal_without_its_database_is_moved_aside(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    (state_dir / "state.db-wal").write_bytes(b"stale")
    with Ledger.open(state_dir) as opened:
        assert opened.in_state() == []
    [aside] = state_dir.glob("state.db.corrupt-*-wal")
    assert aside.read_bytes() == b"stale"


def insert_raw_task(db: sqlite3.Connection, task_id: str, **columns: Any) -> None:
    values: dict[str, Any] = {
        "id": task_id,
        "task_type": "echo",
        "envelope": "sealed",
        "state": "claimed",
        "claimed_at": 1.0,
        "updated_at": 1.0,
    } | columns
    names = ", ".join(values)
    db.execute(
        f"INSERT INTO tasks ({names}) VALUES ({', '.join('?' * len(values))})",  # noqa: S608
        list(values.values()),
    )


def test_damaged_rows_are_quarantined_and_skipped(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    ledger.record_claims([claim("good")])
    with closing(raw_db(ledger.path)) as db:
        insert_raw_task(db, "bad-state", state="exploded")
        insert_raw_task(db, "bad-json", state="finished", success=1, cohort_post="{not json")
        insert_raw_task(db, "bad-time", claimed_at="yesterday")
        insert_raw_task(db, "no-outcome", state="acknowledged")

    with caplog.at_level(logging.ERROR):
        assert [e.id for e in ledger.in_state()] == ["good"]
    for task_id in ("bad-state", "bad-json", "bad-time", "no-outcome"):
        assert f"task {task_id} is damaged" in caplog.text
    assert ledger.counts()["quarantined"] == 4
    with closing(raw_db(ledger.path)) as db:
        reasons = dict(db.execute("SELECT id, reason FROM quarantine").fetchall())
        envelopes = {row[0] for row in db.execute("SELECT envelope FROM quarantine")}
    assert "exploded" in reasons["bad-state"]
    assert "not JSON" in reasons["bad-json"]
    assert envelopes == {"sealed"}
    assert ledger.get("bad-state") is None


def test_damaged_row_found_at_open_is_quarantined(state_dir: Path) -> None:
    with Ledger.open(state_dir) as first:
        first.record_claims([claim("good")])
    with closing(raw_db(state_dir)) as db:
        insert_raw_task(db, "bad", deliveries="many")
    with Ledger.open(state_dir) as second:
        assert second.counts()["quarantined"] == 1
        assert second.counts()["claimed"] == 1


def test_redelivery_of_a_quarantined_task_reports_failure_instead_of_running_it(
    ledger: Ledger,
) -> None:
    with closing(raw_db(ledger.path)) as db:
        insert_raw_task(db, "lost", state="started", interruptions=-0.5)

    redelivered = ledger.record_claims([claim("lost")])["lost"]

    assert redelivered is not None
    assert redelivered.state is TaskState.FINISHED
    assert redelivered.outcome is not None
    assert redelivered.outcome.success is False
    assert "not run again" in (redelivered.outcome.result or "")
    assert [e.id for e in ledger.unsent()] == ["lost"]


def test_state_from_a_newer_trust_poller_is_refused(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    with closing(raw_db(state_dir)) as db:
        db.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    with pytest.raises(StateError, match="upgrade trust-poller") as refused:
        Ledger.open(state_dir)
    assert str(state_dir / "state.db") in str(refused.value)
    assert list(state_dir.glob("*.corrupt-*")) == []
    with closing(raw_db(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION + 1
    with pytest.raises(StateError):  # not StateLocked: the refused open released the lock
        Ledger.open(state_dir)


def test_an_empty_format_0_database_is_migrated(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    with closing(raw_db(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    with Ledger.open(state_dir) as opened:
        opened.record_claims([claim("t1")])
    with closing(raw_db(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION


def test_migrations_upgrade_older_state_and_keep_its_tasks(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ledger.open(state_dir) as old:
        old.record_claims([claim("t1")])
        old.mark_finished("t1", Outcome(True, "kept"))
    newer = FORMAT_VERSION + 1
    migrations = ledger_module.MIGRATIONS | {newer: ("ALTER TABLE tasks ADD COLUMN extra TEXT",)}
    monkeypatch.setattr(ledger_module, "MIGRATIONS", migrations)
    monkeypatch.setattr(ledger_module, "FORMAT_VERSION", newer)

    with Ledger.open(state_dir) as upgraded:
        assert [e.outcome for e in upgraded.unsent()] == [Outcome(True, "kept")]
    with closing(raw_db(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == newer
        assert "extra" in {row[1] for row in db.execute("PRAGMA table_info(tasks)")}


class FullDisk:
    """Stands in for the connection: every statement in `failing` fails as on a full disk."""

    def __init__(self, real: sqlite3.Connection, failing: set[str]) -> None:
        self.real = real
        self.failing = failing

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.split()[0].upper() in self.failing:
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


MUTATIONS = {
    "record_claims": lambda led: led.record_claims([claim("new")]),
    "mark_started": lambda led: led.mark_started("t1"),
    "mark_finished": lambda led: led.mark_finished("t1", Outcome(True, "r")),
    "mark_cohort_delivered": lambda led: led.mark_cohort_delivered("t1"),
    "replace_outcome": lambda led: led.replace_outcome("t2", failure("x"), cohort_pending=False),
    "mark_acknowledged": lambda led: led.mark_acknowledged("t2"),
    "mark_retired": lambda led: led.mark_retired("t2", "404"),
    "set_awaiting_redelivery": lambda led: led.set_awaiting_redelivery("t2", True),
    "note_interrupted": lambda led: led.note_interrupted("t1"),
    "prune": lambda led: led.prune(keep_seconds=-10),
    "store_trust_id": lambda led: led.store_trust_id("x"),
    "check_writable": lambda led: led.check_writable(),
}


@pytest.mark.parametrize("failing", [{"INSERT", "UPDATE", "DELETE"}, {"COMMIT"}])
@pytest.mark.parametrize("method", sorted(MUTATIONS))
def test_a_full_disk_raises_state_unwritable_and_changes_nothing(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, method: str, failing: set[str]
) -> None:
    ledger.record_claims([claim("t1"), claim("t2")])
    ledger.mark_finished("t2", Outcome(True, "r2", COHORT_POST))
    before = (ledger.in_state(), ledger.stored_trust_id())
    real = ledger._db
    monkeypatch.setattr(ledger, "_db", FullDisk(real, failing))

    with pytest.raises(StateUnwritable, match="disk is full") as refused:
        MUTATIONS[method](ledger)

    assert str(ledger.path) in str(refused.value)
    monkeypatch.setattr(ledger, "_db", real)
    assert (ledger.in_state(), ledger.stored_trust_id()) == before
    ledger.record_claims([claim("after")])


def test_a_state_dir_under_a_regular_file_is_unusable(tmp_path: Path) -> None:
    regular = tmp_path / "plain-file"
    regular.write_text("not a directory")
    with pytest.raises(StateError, match="not a directory") as refused:
        Ledger.open(regular / "state")
    assert str(regular / "state") in str(refused.value)


def test_many_threads_share_one_ledger(ledger: Ledger) -> None:
    def work(worker: int) -> None:
        names = [f"w{worker}-{n}" for n in range(25)]
        ledger.record_claims([claim(name) for name in names])
        for name in names:
            ledger.mark_started(name)
            ledger.mark_finished(name, Outcome(True, name))

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.counts()["finished"] == 200


WORKER = """
import sys, time
from pathlib import Path
from trust_poller.ledger import ClaimedTask, Ledger, TaskState
from trust_poller.outcome import Outcome
ledger = Ledger.open(Path(sys.argv[1]))
ids = [f"task-{n:04d}" for n in range(int(sys.argv[2]))]
ledger.record_claims([ClaimedTask(i, "cohort_query", "sealed-" + i) for i in ids])
for entry in ledger.in_state(TaskState.CLAIMED, TaskState.STARTED):
    ledger.mark_started(entry.id)
    ledger.mark_finished(entry.id, Outcome(True, "result-" + entry.id, {"query_id": entry.id}))
    print(entry.id, flush=True)
print("done", flush=True)
time.sleep(60)
"""


def run_worker_and_kill(state_dir: Path, tasks: int, kill_after_lines: int) -> list[str]:
    """Run WORKER, SIGKILL it after it reported `kill_after_lines` tasks; return those reported."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(state_dir), str(tasks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reported: list[str] = []
    assert worker.stdout is not None
    try:
        while len(reported) < kill_after_lines:
            line = worker.stdout.readline().strip()
            assert line, worker.stderr.read() if worker.stderr else "worker ended"
            if line == "done":
                break
            reported.append(line)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        worker.stdout.close()
        if worker.stderr:
            worker.stderr.close()
    assert worker.returncode == -signal.SIGKILL
    return reported


def test_kill_9_at_any_point_leaves_every_task_consistent(state_dir: Path) -> None:
    tasks = 300
    finished_so_far: set[str] = set()
    for round_number, kill_after in enumerate((17, 120, tasks + 1), start=1):
        finished_so_far |= set(run_worker_and_kill(state_dir, tasks, kill_after))
        with Ledger.open(state_dir) as reopened:
            entries = reopened.in_state()
            assert reopened.counts()["quarantined"] == 0
            with closing(raw_db(state_dir)) as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(entries) == tasks
        if round_number == 1:  # the kill really came mid-way
            assert any(entry.state is not TaskState.FINISHED for entry in entries)
        for entry in entries:
            assert entry.deliveries == round_number
            assert entry.envelope == "sealed-" + entry.id
            if entry.state is TaskState.FINISHED:
                assert entry.outcome == Outcome(True, "result-" + entry.id, {"query_id": entry.id})
                assert entry.cohort_pending
            else:
                assert entry.state in (TaskState.CLAIMED, TaskState.STARTED)
                assert entry.outcome is None
                assert entry.id not in finished_so_far
    assert {entry.state for entry in entries} == {TaskState.FINISHED}


def test_default_state_dir_prefers_systemd_state_directory() -> None:
    environ = {"STATE_DIRECTORY": "/var/lib/trust-poller:/var/lib/other", "HOME": "/home/u"}
    assert default_state_dir(environ) == Path("/var/lib/trust-poller")


def test_default_state_dir_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir({"HOME": "/root"}) == Path("/var/lib/trust-poller")


def test_default_state_dir_for_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_state_dir({"HOME": "/home/u"}) == Path("/home/u/.local/state/trust-poller")
    assert default_state_dir({"HOME": "/home/u", "XDG_STATE_HOME": "/xdg"}) == Path(
        "/xdg/trust-poller"
    )
    assert default_state_dir({"HOME": "/home/u", "XDG_STATE_HOME": "relative"}) == Path(
        "/home/u/.local/state/trust-poller"
    )
