"""The loop: heartbeat thread, worker pool, outbox sender, and the claim loop tying them.

`Daemon.run()` is `trust-poller run`; `Daemon.once()` is one cycle for `trust-poller once`.
Neither calls sys.exit: they return or raise, and the CLI maps that to an exit code.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from trust_poller.dispatch import StateWriter, TaskRecord, TaskRunner, envelope_text
from trust_poller.errors import (
    EXIT_OK,
    DaemonCrashed,
    IdentityMismatch,
    StateError,
)
from trust_poller.health import HealthCollector
from trust_poller.heartbeat import Heartbeat
from trust_poller.hub import (
    Halted,
    HubClient,
    HubError,
    HubKeyRejected,
    PendingTask,
)
from trust_poller.identity import IdentityGuard
from trust_poller.kit import Kit
from trust_poller.ledger import ClaimedTask, Ledger, LedgerEntry, StateUnwritable, TaskState
from trust_poller.notify import SystemdNotifier
from trust_poller.outcome import failure
from trust_poller.pacing import Backoff, HubBudgets, HubTrouble
from trust_poller.recovery import Recovery
from trust_poller.redact import Redactor
from trust_poller.reporter import Reporter
from trust_poller.workers import TaskPool

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 3600.0
MAX_TICK_SECONDS = 5.0
# The longest a wait on something other than the stop signal lasts before checking it.
STOP_CHECK_SECONDS = 0.5
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
            kit.hub_heartbeats_per_minute,
            kit.hub_polls_per_minute,
            kit.hub_results_per_minute,
            minute=kit.hub_rate_window,
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
        self.crashed: str | None = None

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
        """Start-up: what the state directory holds from the last run (see recovery.py)."""
        recovery = Recovery(self.kit, self.ledger, self.runner, self.writer, self.pool.submit)
        if recovery.recover():
            self.reporter.wake()

    def claim(self, client: HubClient) -> int:
        """One poll: record every task durably, then queue the new ones. Returns the count."""
        try:
            _identity, tasks = client.pending_tasks(self.budgets.polls)
        except HubError as exc:
            if exc.reply_unusable:
                log.error(
                    "poll refused: %s; the hub marked the tasks in that reply IN_PROGRESS "
                    "before sending it, so they stay claimed on the hub until its 30-minute "
                    "re-queue and are delivered again after that",
                    exc.reason,
                )
            raise
        if not tasks:
            return 0
        claimed = [
            ClaimedTask(t.id, t.task_type, envelope_text(t.payload), t.created_at) for t in tasks
        ]
        try:
            known = self.ledger.record_claims(claimed)
        except StateUnwritable as exc:
            log.error(
                "%s: %d claimed tasks could not be recorded and stay claimed on the hub "
                "until its 30-minute re-queue",
                exc,
                len(tasks),
            )
            raise
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
        """What `systemctl status` shows: one line, problems first, read at a glance."""
        last = self.heartbeat.last_success
        hub = self.trouble.state
        if last is None and hub == "ok":
            hub = "not reached yet"
        age = f"{time.monotonic() - last:.0f}s ago" if last is not None else "none yet"
        try:
            waiting = str(self.ledger.counts().get("unsent", 0))
        except (StateUnwritable, StateError, RuntimeError):
            waiting = "unknown"  # the status line must never stop the loop that sends it
        parts = []
        if self.heartbeat.key_match is False:
            parts.append("STALE KIT (hub's AES key differs): claiming paused")
        if self.writer.trouble.failing:
            parts.append("STATE UNWRITABLE: claiming paused")
        if self.draining.is_set():
            parts.append("draining")
        parts += [
            f"hub {hub}",
            f"last heartbeat {age}",
            f"{self.pool.running} running, {self.pool.waiting} queued",
            f"{waiting} results waiting",
        ]
        return "; ".join(parts)

    def _turn(self) -> None:
        """Once per turn of the main loop: prove liveness and say how things are.

        WATCHDOG=1 only comes from here, so a wedged loop stops it (and systemd restarts
        us) while a hub outage does not: the loop keeps turning through one.
        """
        self.notifier.alive(self.status_line())

    def _pause(self, seconds: float, until: threading.Event) -> None:
        deadline = time.monotonic() + seconds
        while not until.is_set() and not self.halt.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            until.wait(min(remaining, self.tick))
            self._turn()

    # -- run -------------------------------------------------------------------------------

    def _guarded(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        """A thread that dies would leave the daemon half alive (no heartbeats, say): stop
        everything instead, so systemd restarts a whole daemon."""

        def guarded() -> None:
            try:
                body()
            except Exception:
                log.critical("the %s thread crashed; stopping trust-poller", name, exc_info=True)
                self.crashed = name
                self.halt.set()

        return guarded

    def _start_threads(self) -> list[threading.Thread]:
        targets = [("heartbeat", self.heartbeat.run), ("reporter", self.reporter.run)]
        if self.health is not None:
            health = self.health
            targets.append(("health", lambda: health.run(self.halt)))
        threads = [
            threading.Thread(target=self._guarded(n, t), name=n, daemon=True) for n, t in targets
        ]
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
        if self.crashed is not None:
            raise DaemonCrashed(f"the {self.crashed} thread crashed (see the traceback above)")

    def _claim_loop(self, client: HubClient) -> None:
        """Poll whenever a claim would start at once, never faster than the hub allows.

        Idle polls keep one rhythm with the heartbeats (an idle cycle costs two requests);
        after a poll that returned tasks the next comes as soon as they have all started;
        failures back off. Every wait here ends within STOP_CHECK_SECONDS of a signal.
        """
        interval = self.kit.poll_interval
        backoff = Backoff(interval)
        recovered = False
        last_prune = float("-inf")
        next_poll = time.monotonic()
        while not self.draining.is_set() and not self.halt.is_set():
            self._turn()
            if not self.guard.verified.is_set():
                self.guard.verified.wait(STOP_CHECK_SECONDS)
                continue
            if not recovered:
                self.recover()
                recovered = True
            if time.monotonic() - last_prune > PRUNE_EVERY_SECONDS:
                last_prune = time.monotonic()
                self._prune()
            if not self.heartbeat.claiming_allowed:
                self._pause(interval, self.draining)
                continue
            # The hub hands out up to 50 tasks and cannot be asked for fewer: claim only when
            # they would start at once, so none waits here while the hub's re-queue clock runs.
            if not self.pool.wait_claimable(STOP_CHECK_SECONDS):
                continue
            wait = max(next_poll - time.monotonic(), self.budgets.polls.wait_seconds())
            if wait > 0:
                self._pause(wait, self.draining)
                continue
            started = time.monotonic()
            try:
                self.ledger.check_writable()
                claimed = self.claim(client)
            except StateUnwritable as exc:
                self.writer.trouble.failed(
                    f"{exc}; claiming is stopped until it can", logging.ERROR
                )
                next_poll = time.monotonic() + interval
                continue
            except (Halted, IdentityMismatch):
                return
            except (HubError, HubKeyRejected) as exc:
                self.trouble.failed_call(exc, channel="poll")
                next_poll = time.monotonic() + backoff.next_delay()
                continue
            self.writer.trouble.recovered("state directory writable again")
            self.trouble.succeeded("poll")
            backoff.reset()
            if claimed:
                next_poll = time.monotonic()  # again as soon as every claimed task has started
            elif next_poll + interval > started:
                next_poll += interval  # on schedule: keep the rhythm, no drift
            else:
                next_poll = started + interval

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
        while not self.halt.is_set():
            left_to_wait = max(0.0, deadline - time.monotonic())
            if self.pool.wait_running_done(min(self.tick, left_to_wait)):
                break
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
        self.runner.keep_records = True
        try:
            self.heartbeat.beat(client)
            self.ledger.check_writable()  # before anything starts: a task must never be cut off
            outbox = self.ledger.in_state(TaskState.FINISHED)
            self.pool.start()
            self.recover()
            self.reporter.send_pending(client)
            poll_failed: HubError | HubKeyRejected | None = None
            if self.heartbeat.claiming_allowed:
                try:
                    self.claim(client)
                except (HubError, HubKeyRejected) as exc:
                    poll_failed = exc  # raised once what already runs has finished and is kept
            else:
                log.warning("not claiming: the kit's AES key differs from the hub's")
            self.pool.wait_idle(None)
            self.reporter.send_pending(client)
            if poll_failed is not None:
                raise poll_failed
            resent = [
                TaskRecord(entry.id, entry.task_type, entry.outcome)
                for entry in outbox
                if entry.id not in self.runner.records
            ]
            records = resent + list(self.runner.records.values())
            unsent = self.ledger.in_state(TaskState.FINISHED)
            return OnceSummary(records, unsent)
        finally:
            self.halt.set()
            self.pool.close()
            client.close()
            self.runner.close()
