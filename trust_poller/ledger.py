"""Where every claimed task and unsent result lives: a durable ledger and write-ahead outbox.

Each change is one sqlite transaction (WAL, synchronous=FULL), so a kill -9 at any instant
leaves every task as it was before or after its last change. A recorded task id is never
handed out as new again: a redelivery returns the existing entry instead.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trust_poller.errors import EXIT_TEMPORARY, StateError, TrustPollerError
from trust_poller.ledger_rows import (
    BadRow,
    ClaimedTask,
    LedgerEntry,
    TaskState,
    entry_from_row,
    outcome_columns,
)
from trust_poller.outcome import Outcome, failure
from trust_poller.state_dir import (
    DB_FILE,
    StateDirLock,
    is_damage,
    make_state_dir,
    open_database,
    restrict_modes,
)
from trust_poller.state_dir import default_state_dir as default_state_dir

log = logging.getLogger(__name__)

# Re-exported: callers take the ledger's vocabulary from the ledger module.
__all__ = [
    "FORMAT_VERSION",
    "ClaimedTask",
    "Ledger",
    "LedgerEntry",
    "StateUnwritable",
    "TaskState",
    "TransitionRefused",
    "UnknownTask",
    "default_state_dir",
]

FORMAT_VERSION = 1


class StateUnwritable(TrustPollerError):
    """The state cannot be written (disk full, read-only, I/O error); names the directory.

    `run` keeps going (claiming stops until it can write); `once` exits 75, try again later.
    """

    exit_code = EXIT_TEMPORARY


class UnknownTask(LookupError):
    """A change was asked for a task id the ledger does not hold."""


class TransitionRefused(ValueError):
    """A change that would break the lifecycle, e.g. starting a task that already finished."""


_COLUMNS = (
    "seq, id, task_type, envelope, created_at, state, interruptions, success, result, "
    "cohort_post, cohort_pending, awaiting_redelivery, deliveries, claimed_at, updated_at, "
    "finished_order, note"
)
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE tasks (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            task_type TEXT NOT NULL, envelope TEXT NOT NULL, created_at TEXT,
            state TEXT NOT NULL, interruptions INTEGER NOT NULL DEFAULT 0,
            success INTEGER, result TEXT, cohort_post TEXT,
            cohort_pending INTEGER NOT NULL DEFAULT 0,
            awaiting_redelivery INTEGER NOT NULL DEFAULT 0,
            deliveries INTEGER NOT NULL DEFAULT 1, claimed_at REAL NOT NULL,
            updated_at REAL NOT NULL, finished_order INTEGER, note TEXT)""",
        "CREATE INDEX tasks_by_state ON tasks (state, finished_order)",
        f"CREATE TABLE quarantine ({_COLUMNS}, reason TEXT, quarantined_at REAL)",
    ),
}
_SELECT = (
    "SELECT seq, id, task_type, envelope, state, interruptions, success, result, cohort_post, "
    "cohort_pending, awaiting_redelivery, deliveries, claimed_at, updated_at, note FROM tasks"
)
_NEXT_FINISHED = "(SELECT COALESCE(MAX(finished_order), 0) + 1 FROM tasks)"
_NOT_RUN_AGAIN = (
    "this trust's record of the task was damaged; it was not run again, to never run twice"
)


def _quarantine(db: sqlite3.Connection, seq: int, reason: str) -> None:
    db.execute(
        f"INSERT INTO quarantine ({_COLUMNS}, reason, quarantined_at) "  # noqa: S608 (constants)
        f"SELECT {_COLUMNS}, ?, ? FROM tasks WHERE seq = ?",
        (reason, time.time(), seq),
    )
    db.execute("DELETE FROM tasks WHERE seq = ?", (seq,))


class Ledger:
    """The task ledger in `<state_dir>/state.db`; one connection, safe to call from many threads."""

    def __init__(self, path: Path, lock: StateDirLock, db: sqlite3.Connection) -> None:
        self.path = path
        self._lock = lock
        self._db = db
        self._guard = threading.RLock()
        self._closed = False

    @classmethod
    def open(cls, state_dir: Path) -> Ledger:
        make_state_dir(state_dir)
        lock = StateDirLock(state_dir)
        try:
            db = open_database(state_dir, FORMAT_VERSION, MIGRATIONS)
            restrict_modes(lock.path)
        except BaseException:
            lock.release()
            raise
        ledger = cls(state_dir, lock, db)
        try:
            ledger.in_state()  # reads every row once, so damaged ones are quarantined at start
            ledger._log_recovered()
        except BaseException:
            ledger.close()
            raise
        return ledger

    def _log_recovered(self) -> None:
        """What an earlier run left, said once at open: before any thread can change it."""
        counts = self.counts()
        claimed, started, unsent = counts["claimed"], counts["started"], counts["unsent"]
        if claimed or started or unsent:
            log.info(
                "recovered from %s: %d claimed but not started, %d interrupted, %d results unsent",
                self.path,
                claimed,
                started,
                unsent,
            )

    def close(self) -> None:
        with self._guard:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._lock.release()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _using(self, write: bool) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, in one transaction when `write`; no raw sqlite errors."""
        with self._guard:
            if self._closed:
                raise RuntimeError(f"the ledger in {self.path} is closed")
            db = self._db
            try:
                if write:
                    db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    if write:
                        db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                    raise
            except (sqlite3.OperationalError, OSError) as error:
                raise StateUnwritable(
                    f"state directory {self.path} cannot be written: {error}; "
                    "fix: free disk space, or make the file system writable"
                ) from error
            except sqlite3.Error as error:
                damage = "is damaged" if is_damage(error) else "refused a change"
                raise StateError(
                    f"state database {self.path / DB_FILE} {damage}: {error}; "
                    "fix: restart trust-poller, which sets a damaged database aside"
                ) from error

    def _select(self, where: str = "", params: Sequence[Any] = ()) -> list[LedgerEntry]:
        """Entries matching `where`; damaged rows are moved to quarantine, logged and skipped."""
        entries: list[LedgerEntry] = []
        damaged: list[tuple[int, Any, str]] = []
        with self._guard, self._using(write=False) as db:
            for row in db.execute(f"{_SELECT} {where}", params).fetchall():
                try:
                    entries.append(entry_from_row(row))
                except BadRow as bad:
                    damaged.append((row[0], row[1], str(bad)))
            if damaged:
                try:
                    with self._using(write=True) as db:
                        for seq, _, reason in damaged:
                            _quarantine(db, seq, reason)
                except StateUnwritable as error:
                    log.error("could not move damaged ledger rows to quarantine: %s", error)
        for _, task_id, reason in damaged:
            log.error("ledger row for task %s is damaged (%s): skipped", task_id, reason)
        return entries

    def _change(
        self, task_id: str, allowed_from: set[TaskState] | None, assignments: str, *params: Any
    ) -> None:
        """Update one task in its own transaction, if its state allows it."""
        with self._using(write=True) as db:
            row = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"task {task_id} is not in the ledger in {self.path}")
            if allowed_from is not None and row[0] not in allowed_from:
                raise TransitionRefused(f"task {task_id} is {row[0]}: refused {assignments}")
            db.execute(
                f"UPDATE tasks SET {assignments}, updated_at = ? WHERE id = ?",  # noqa: S608
                (*params, time.time(), task_id),
            )

    def _set_meta(self, key: str, value: str) -> None:
        with self._using(write=True) as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def stored_trust_id(self) -> str | None:
        with self._using(write=False) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'trust_id'").fetchone()
        return None if row is None else str(row[0])

    def store_trust_id(self, trust_id: str) -> None:
        self._set_meta("trust_id", trust_id)

    def check_writable(self) -> None:
        self._set_meta("last_write_check", repr(time.time()))

    def record_claims(self, tasks: Sequence[ClaimedTask]) -> dict[str, LedgerEntry | None]:
        """New ids map to None; a redelivered id maps to its entry, deliveries already counted."""
        claims: dict[str, LedgerEntry | None] = {}
        damaged: list[tuple[str, str]] = []
        with self._using(write=True) as db:
            for task in tasks:
                if task.id in claims:
                    continue
                row = db.execute(f"{_SELECT} WHERE id = ?", (task.id,)).fetchone()
                try:
                    if row is not None:
                        entry_from_row(row)
                        db.execute(
                            "UPDATE tasks SET deliveries = deliveries + 1 WHERE id = ?", (task.id,)
                        )
                except BadRow as bad:
                    _quarantine(db, row[0], str(bad))
                    damaged.append((task.id, str(bad)))
                    row = None
                if row is None:
                    claims[task.id] = self._insert(db, task)
                else:
                    claims[task.id] = entry_from_row(
                        db.execute(f"{_SELECT} WHERE id = ?", (task.id,)).fetchone()
                    )
        for task_id, reason in damaged:
            log.error("ledger row for task %s is damaged (%s): quarantined", task_id, reason)
        return claims

    def _insert(self, db: sqlite3.Connection, task: ClaimedTask) -> LedgerEntry | None:
        now = time.time()
        values = (task.id, task.task_type, task.envelope, task.created_at, now, now)
        if not db.execute("SELECT 1 FROM quarantine WHERE id = ?", (task.id,)).fetchone():
            db.execute(
                "INSERT INTO tasks (id, task_type, envelope, created_at, claimed_at, updated_at, "
                "state) VALUES (?, ?, ?, ?, ?, ?, 'claimed')",
                values,
            )
            return None
        # Its history is lost: report a failure rather than risk running it twice.
        log.error("task %s was redelivered after its ledger row was quarantined", task.id)
        db.execute(
            "INSERT INTO tasks (id, task_type, envelope, created_at, claimed_at, updated_at, "  # noqa: S608
            "state, success, result, cohort_post, note, finished_order) "
            f"VALUES (?, ?, ?, ?, ?, ?, 'finished', ?, ?, ?, ?, {_NEXT_FINISHED})",
            (*values, *outcome_columns(failure(_NOT_RUN_AGAIN)), "redelivered after quarantine"),
        )
        return entry_from_row(db.execute(f"{_SELECT} WHERE id = ?", (task.id,)).fetchone())

    def mark_started(self, task_id: str) -> None:
        self._change(task_id, {TaskState.CLAIMED, TaskState.STARTED}, "state = 'started'")

    def mark_finished(self, task_id: str, outcome: Outcome) -> None:
        """Any state: a redelivered ACKNOWLEDGED/RETIRED task puts its result back to resend."""
        self._change(
            task_id,
            None,
            "state = 'finished', success = ?, result = ?, cohort_post = ?, cohort_pending = ?, "
            f"awaiting_redelivery = 0, finished_order = {_NEXT_FINISHED}",
            *outcome_columns(outcome),
            outcome.cohort_post is not None,
        )

    def mark_cohort_delivered(self, task_id: str) -> None:
        self._change(task_id, None, "cohort_pending = 0")

    def replace_outcome(self, task_id: str, outcome: Outcome, *, cohort_pending: bool) -> None:
        self._change(
            task_id,
            {TaskState.FINISHED},
            "success = ?, result = ?, cohort_post = ?, cohort_pending = ?",
            *outcome_columns(outcome),
            cohort_pending,
        )

    def mark_acknowledged(self, task_id: str) -> None:
        allowed = {TaskState.FINISHED, TaskState.ACKNOWLEDGED}
        self._change(task_id, allowed, "state = 'acknowledged', awaiting_redelivery = 0")

    def mark_retired(self, task_id: str, note: str) -> None:
        allowed = set(TaskState) - {TaskState.ACKNOWLEDGED}
        self._change(task_id, allowed, "state = 'retired', note = ?", note)

    def set_awaiting_redelivery(self, task_id: str, waiting: bool) -> None:
        self._change(task_id, None, "awaiting_redelivery = ?", waiting)

    def note_interrupted(self, task_id: str) -> int:
        with self._guard:
            self._change(task_id, None, "interruptions = interruptions + 1")
            with self._using(write=False) as db:
                row = db.execute("SELECT interruptions FROM tasks WHERE id = ?", (task_id,))
                return int(row.fetchone()[0])

    def get(self, task_id: str) -> LedgerEntry | None:
        entries = self._select("WHERE id = ?", (task_id,))
        return entries[0] if entries else None

    def in_state(self, *states: TaskState) -> list[LedgerEntry]:
        """Entries in any of `states` (every entry when none is given), in claim order."""
        if not states:
            return self._select("ORDER BY seq")
        marks = ", ".join("?" * len(states))
        return self._select(f"WHERE state IN ({marks}) ORDER BY seq", [str(s) for s in states])

    def unsent(self) -> list[LedgerEntry]:
        """Finished results to send, oldest finish first; not those waiting for a redelivery."""
        where = "WHERE state = 'finished' AND awaiting_redelivery = 0"
        return self._select(f"{where} ORDER BY finished_order, seq")

    def prune(self, now: float | None = None, keep_seconds: float = 48 * 3600) -> int:
        cutoff = (time.time() if now is None else now) - keep_seconds
        with self._using(write=True) as db:
            return db.execute(
                "DELETE FROM tasks WHERE state IN ('acknowledged', 'retired') AND updated_at < ?",
                (cutoff,),
            ).rowcount

    def counts(self) -> dict[str, int]:
        """Entries per state name, plus "unsent" and "quarantined"."""
        counts = dict.fromkeys([str(state) for state in TaskState], 0)
        unsent = "SELECT COUNT(*) FROM tasks WHERE state = 'finished' AND awaiting_redelivery = 0"
        with self._using(write=False) as db:
            for state, count in db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
                if state in counts:
                    counts[state] = count
            counts["unsent"] = db.execute(unsent).fetchone()[0]
            counts["quarantined"] = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return counts
