"""The loop: heartbeat thread, worker pool, outbox sender, and the claim loop tying them.

`Daemon.run()` is `trust-poller run`; `Daemon.once()` is one cycle for `trust-poller once`.
Neither calls sys.exit: they return or raise, and the CLI maps that to an exit code.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from trust_poller.dispatch import StateWriter, TaskRecord, TaskRunner, envelope_text
from trust_poller.errors import EXIT_OK, IdentityMismatch
from trust_poller.health import HealthCollector
from trust_poller.heartbeat import Heartbeat
from trust_poller.hub import (
    Halted,
    HubClient,
    HubError,
    HubKeyRejected,
    HubRateLimited,
    PendingTask,
)
from trust_poller.identity import IdentityGuard
from trust_poller.kit import Kit
from trust_poller.ledger import ClaimedTask, Ledger, LedgerEntry, StateUnwritable, TaskState
from trust_poller.notify import SystemdNotifier
from trust_poller.outcome import failure
from trust_poller.pacing import Backoff, HubBudgets, HubTrouble
from trust_poller.redact import Redactor
from trust_poller.reporter import Reporter
from trust_poller.workers import TaskPool

log = logging.getLogger(__name__)

MAX_INTERRUPTIONS = 3
PRUNE_EVERY_SECONDS = 3600.0
MAX_TICK_SECONDS = 5.0
FINAL_REPORT_SECONDS = 10.0


@dataclass(frozen=True)
class OnceSummary:
    records: list[TaskRecord]
    unsent: list[LedgerEntry]


class Daemon:
    def __init__(
        self,
        kit: Kit,
        ledger: Ledger,
        redactor: Redactor,
        *,
        notifier: SystemdNotifier | None = None,
        health: HealthCollector | None = None,
    ) -> None:
        self.kit = kit
        self.ledger = ledger
        self.notifier = notifier or SystemdNotifier(None)
        self.health = health
        self.halt = threading.Event()
        self.draining = threading.Event()
        self.budgets = HubBudgets(
            kit.hub_heartbeats_per_minute, kit.hub_polls_per_minute, kit.hub_results_per_minute
        )
        self.trouble = HubTrouble()
        self.guard = IdentityGuard(
            kit.expected_trust_id,
            self.halt,
            stored=ledger.stored_trust_id(),
            store=ledger.store_trust_id,
        )
        self.writer = StateWriter(self.halt)
        self.reporter = Reporter(
            kit, ledger, self.budgets, self.guard, self.trouble, self.writer, redactor, self.halt
        )
        self.runner = TaskRunner(kit, ledger, redactor, self.writer, self.reporter.wake)
        self.pool = TaskPool(kit.max_concurrent_tasks, kit.max_concurrent_queries)
        self.heartbeat = Heartbeat(kit, self.budgets, self.guard, self.trouble, self.halt, health)
        watchdog = self.notifier.watchdog_interval()
        self.tick = min(MAX_TICK_SECONDS, watchdog) if watchdog else MAX_TICK_SECONDS
        self._signals = 0

    # -- signals -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """From a signal handler: the first drains, the second exits at once (state is durable)."""
        self._signals += 1
        if self._signals == 1:
            self.draining.set()
        else:
            os._exit(EXIT_OK)

    # -- the claim side ------------------------------------------------------------------

    def recover(self) -> None:
        """Start-up: run what was claimed, re-run what was interrupted (unless unsafe)."""
        claimed = self.ledger.in_state(TaskState.CLAIMED)
        started = self.ledger.in_state(TaskState.STARTED)
        unsent = self.ledger.unsent()
        if claimed or started or unsent:
            log.info(
                "recovered from %s: %d claimed but not started, %d interrupted, %d results unsent",
                self.ledger.path,
                len(claimed),
                len(started),
                len(unsent),
            )
        for entry in claimed:
            self.pool.submit(self.runner.job(entry.id, entry.task_type, entry.envelope))
        for entry in started:
            self._resume_interrupted(entry)
        if unsent:
            self.reporter.wake()

    def _resume_interrupted(self, entry: LedgerEntry) -> None:
        interruptions = self.ledger.note_interrupted(entry.id)
        if interruptions >= MAX_INTERRUPTIONS:
            log.error(
                "task %s (%s) was interrupted %d times; failing it as poison",
                entry.id,
                entry.task_type,
                interruptions,
            )
            self.runner.finish(
                entry.id,
                entry.task_type,
                failure(
                    f"task was interrupted {interruptions} times while running (the trust's "
                    "daemon stopped or crashed each time); failed as poison instead of "
                    "running again"
                ),
            )
        elif entry.task_type == "create_imaging":
            log.error(
                "create_imaging task %s was interrupted; reporting it failed, not re-running",
                entry.id,
            )
            self.runner.finish(
                entry.id,
                entry.task_type,
                failure(
                    "create_imaging was interrupted while running (trust-poller stopped or "
                    "crashed); the imaging project may be partly created and users may have "
                    "been e-mailed — check the project in XNAT / imaging-api before creating "
                    "it again"
                ),
            )
        else:
            log.warning(
                "task %s (%s) was interrupted; running it again (it is safe to repeat)",
                entry.id,
                entry.task_type,
            )
            self.pool.submit(self.runner.job(entry.id, entry.task_type, entry.envelope))

    def claim(self, client: HubClient) -> int:
        """One poll: record every task durably, then queue the new ones. Returns the count."""
        _identity, tasks = client.pending_tasks(self.budgets.polls)
        if not tasks:
            return 0
        claimed = [ClaimedTask(t.id, t.task_type, _envelope(t), t.created_at) for t in tasks]
        try:
            known = self.ledger.record_claims(claimed)
        except StateUnwritable as exc:
            log.error(
                "%s: %d claimed tasks could not be recorded and stay claimed on the hub "
                "until its 30-minute re-queue",
                exc,
                len(tasks),
            )
            return 0
        for task in tasks:
            self._take(task, known.get(task.id))
        return len(tasks)

    def _take(self, task: PendingTask, existing: LedgerEntry | None) -> None:
        if existing is None:
            if task.problem is not None:
                self.runner.finish(task.id, task.task_type, failure(task.problem))
            else:
                self.pool.submit(self.runner.job(task.id, task.task_type, task.payload))
            return
        log.info("task %s delivered again (%s here); not running it twice", task.id, existing.state)
        if existing.state is TaskState.FINISHED:
            self.writer.write(lambda: self.ledger.set_awaiting_redelivery(task.id, False))
            self.reporter.wake()
        elif existing.state in (TaskState.ACKNOWLEDGED, TaskState.RETIRED) and existing.outcome:
            outcome = existing.outcome
            self.writer.write(lambda: self.ledger.mark_finished(task.id, outcome))
            self.reporter.wake()

    # -- status and waiting ----------------------------------------------------------------

    def status_line(self) -> str:
        last = self.heartbeat.last_success
        age = f"{time.monotonic() - last:.0f}s ago" if last is not None else "none yet"
        counts = self.ledger.counts()
        parts = [
            f"hub {self.trouble.state}",
            f"last heartbeat {age}",
            f"{self.pool.running} running, {self.pool.waiting} queued",
            f"{counts.get('unsent', 0)} results waiting",
        ]
        if self.heartbeat.key_match is False:
            parts.append("STALE KIT: claiming paused")
        if self.writer.trouble.failing:
            parts.append("STATE UNWRITABLE: claiming paused")
        if self.draining.is_set():
            parts.append("draining")
        return "; ".join(parts)

    def _turn(self) -> None:
        """Once per turn of the main loop: prove liveness and say how things are."""
        self.notifier.watchdog()
        self.notifier.status(self.status_line())

    def _pause(self, seconds: float, until: threading.Event) -> None:
        deadline = time.monotonic() + seconds
        while not until.is_set() and not self.halt.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            until.wait(min(remaining, self.tick))
            self._turn()

    # -- run -------------------------------------------------------------------------------

    def _start_threads(self) -> list[threading.Thread]:
        targets = [("heartbeat", self.heartbeat.run), ("reporter", self.reporter.run)]
        if self.health is not None:
            health = self.health
            targets.append(("health", lambda: health.run(self.halt)))
        threads = [threading.Thread(target=t, name=n, daemon=True) for n, t in targets]
        for thread in threads:
            thread.start()
        self.pool.start()
        return threads

    def run(self) -> None:
        """Until a signal: raises IdentityMismatch when the hub names another trust."""
        threads = self._start_threads()
        self.notifier.ready()
        client = HubClient(self.kit, self.halt, on_identity=self.guard.check)
        try:
            self._claim_loop(client)
            if self.guard.fatal is None:
                self._drain()
        finally:
            self.halt.set()
            self.notifier.stopping()
            self.pool.close()
            for thread in threads:
                thread.join(timeout=2.0)
            client.close()
            self.runner.close()
        if self.guard.fatal is not None:
            raise self.guard.fatal

    def _claim_loop(self, client: HubClient) -> None:
        backoff = Backoff(self.kit.poll_interval)
        recovered = False
        last_prune = float("-inf")
        while not self.draining.is_set() and not self.halt.is_set():
            self._turn()
            if not self.guard.verified.is_set():
                self.guard.verified.wait(self.tick)
                continue
            if not recovered:
                self.recover()
                recovered = True
            if time.monotonic() - last_prune > PRUNE_EVERY_SECONDS:
                last_prune = time.monotonic()
                self._prune()
            if not self.heartbeat.claiming_allowed or not self.pool.wait_all_started(self.tick):
                self._pause(
                    self.kit.poll_interval if not self.heartbeat.claiming_allowed else 0,
                    self.draining,
                )
                continue
            try:
                self.ledger.check_writable()
                claimed = self.claim(client)
            except StateUnwritable as exc:
                self.writer.trouble.failed(
                    f"{exc}; claiming is stopped until it can", logging.ERROR
                )
                self._pause(self.kit.poll_interval, self.draining)
                continue
            except (Halted, IdentityMismatch):
                return
            except HubKeyRejected as exc:
                self.trouble.failed(str(exc), key_rejected=True)
                self._pause(backoff.next_delay(), self.draining)
                continue
            except HubRateLimited as exc:
                self.trouble.failed(exc.reason, rate_limited=True)
                self._pause(backoff.next_delay(), self.draining)
                continue
            except HubError as exc:
                self.trouble.failed(f"poll: {exc.reason}")
                self._pause(backoff.next_delay(), self.draining)
                continue
            self.writer.trouble.recovered("state directory writable again")
            self.trouble.succeeded()
            backoff.reset()
            if not claimed:
                self._pause(self.kit.poll_interval, self.draining)

    def _prune(self) -> None:
        try:
            pruned = self.ledger.prune()
        except StateUnwritable as exc:
            log.warning("could not prune old entries: %s", exc)
            return
        if pruned:
            log.info("pruned %d settled entries older than 48 hours", pruned)

    def _drain(self) -> None:
        """First signal: claim nothing more, let running handlers finish, report, stop."""
        left = self.pool.stop_starting()
        running = self.pool.running
        log.info(
            "stopping: waiting up to %.0f s for %d running tasks (%d queued stay claimed "
            "for the next start)",
            self.kit.drain_timeout,
            running,
            len(left),
        )
        self.notifier.extend_timeout(self.kit.drain_timeout + FINAL_REPORT_SECONDS + 5)
        deadline = time.monotonic() + self.kit.drain_timeout
        while not self.pool.wait_running_done(self.tick) and not self.halt.is_set():
            self._turn()
            if time.monotonic() >= deadline:
                log.warning(
                    "%d tasks still running at the drain deadline; they stay 'started' "
                    "for the next start to handle",
                    self.pool.running,
                )
                break
        self.reporter.wake()
        final = time.monotonic() + FINAL_REPORT_SECONDS
        while self.ledger.unsent() and time.monotonic() < final and not self.halt.is_set():
            self.halt.wait(0.2)
        unsent = len(self.ledger.unsent())
        if unsent:
            log.warning(
                "%d results are kept in %s and will be sent at the next start",
                unsent,
                self.ledger.path,
            )

    # -- once ------------------------------------------------------------------------------

    def once(self) -> OnceSummary:
        """Heartbeat (identity check), re-send, claim once, run, report — then return."""
        client = HubClient(self.kit, self.halt, on_identity=self.guard.check)
        try:
            self.heartbeat.beat(client)
            self.pool.start()
            self.recover()
            self.reporter.send_pending(client)
            if self.heartbeat.claiming_allowed:
                self.ledger.check_writable()
                self.claim(client)
            else:
                log.warning("not claiming: the kit's AES key differs from the hub's")
            self.pool.wait_idle(None)
            self.reporter.send_pending(client)
            records = list(self.runner.records.values())
            unsent = self.ledger.in_state(TaskState.FINISHED)
            return OnceSummary(records, unsent)
        finally:
            self.halt.set()
            self.pool.close()
            client.close()
            self.runner.close()


def _envelope(task: PendingTask) -> str:
    return envelope_text(task.payload)
