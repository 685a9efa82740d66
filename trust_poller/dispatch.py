"""What happens to one claimed task: open its payload, run its handler, record the outcome.

The outcome is durable in the ledger before anyone tries to report it (write-ahead).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trust_poller import crypto
from trust_poller.errors import PayloadRejected
from trust_poller.handlers import (
    COHORT_TYPES,
    HandlerContext,
    ordering_keys,
    run_handler,
)
from trust_poller.kit import Kit
from trust_poller.ledger import Ledger, StateUnwritable
from trust_poller.outcome import Outcome, failure, prepare_for_hub
from trust_poller.pacing import ProblemLog
from trust_poller.redact import Redactor
from trust_poller.services import ServiceClient
from trust_poller.workers import Job

log = logging.getLogger(__name__)

STATE_RETRY_SECONDS = 5.0


@dataclass
class TaskRecord:
    """What `once` prints for a task: how it ended and how long it took."""

    task_id: str
    task_type: str
    outcome: Outcome | None = None
    seconds: float = 0.0


def envelope_text(payload: object) -> str:
    """The payload as received, for the ledger (non-strings kept as their JSON text)."""
    if isinstance(payload, str):
        return payload
    try:
        return json.dumps(payload)
    except (TypeError, ValueError, RecursionError):  # repr() would recurse just as deep
        return f"<a {type(payload).__name__} payload that cannot be stored as text>"


def outcome_summary(outcome: Outcome) -> str:
    if outcome.success:
        return "succeeded"
    try:
        document: Any = json.loads(outcome.result or "{}")
        reason = str(document.get("error", "failed"))
    except (ValueError, AttributeError):
        reason = "failed"
    return f"failed: {reason[:100]}"


class StateWriter:
    """Writes that must land: retried every few seconds while the disk refuses, said loudly."""

    def __init__(self, halt: threading.Event) -> None:
        self.halt = halt
        self.trouble = ProblemLog("state directory cannot be written")

    def write(self, change: Callable[[], None]) -> bool:
        while not self.halt.is_set():
            try:
                change()
            except StateUnwritable as exc:
                self.trouble.failed(f"{exc}; claiming is stopped until it can", logging.ERROR)
                self.halt.wait(STATE_RETRY_SECONDS)
                continue
            self.trouble.recovered("state directory writable again")
            return True
        return False


class TaskRunner:
    def __init__(
        self,
        kit: Kit,
        ledger: Ledger,
        redactor: Redactor,
        writer: StateWriter,
        on_finished: Callable[[str], None],
    ) -> None:
        self.kit = kit
        self.ledger = ledger
        self.redactor = redactor
        self.writer = writer
        self.on_finished = on_finished
        # Only `once` prints a summary; a long-running daemon keeps no per-task records.
        self.keep_records = False
        self.records: dict[str, TaskRecord] = {}
        self._local = threading.local()
        self._clients: list[ServiceClient] = []
        self._lock = threading.Lock()

    def _services(self) -> ServiceClient:
        client: ServiceClient | None = getattr(self._local, "client", None)
        if client is None:
            client = ServiceClient(self.kit)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()

    def job(self, task_id: str, task_type: str, envelope: object) -> Job:
        """Open the payload now (its ordering keys decide where it queues); run it later."""
        payload: dict[str, Any] | None = None
        rejection: Outcome | None = None
        try:
            payload = crypto.open_task_payload(self.kit.aes_key, task_type, envelope)
        except PayloadRejected as reason:
            rejection = failure(str(reason))
        keys = ordering_keys(task_type, payload) if payload is not None else ()
        if self.keep_records:
            self.records[task_id] = TaskRecord(task_id, task_type)
        return Job(
            task_id,
            task_type,
            keys,
            task_type in COHORT_TYPES and payload is not None,
            lambda: self._execute(task_id, task_type, payload, rejection),
        )

    def _execute(
        self,
        task_id: str,
        task_type: str,
        payload: dict[str, Any] | None,
        rejection: Outcome | None,
    ) -> None:
        if not self.writer.write(lambda: self.ledger.mark_started(task_id)):
            return
        started = time.monotonic()
        if payload is None:
            outcome = rejection or failure("payload could not be opened")
            log.warning("task %s (%s) rejected: %s", task_id, task_type, outcome_summary(outcome))
        else:
            context = HandlerContext(task_id=task_id, kit=self.kit, services=self._services())
            outcome = run_handler(task_type, payload, context)
        self.finish(task_id, task_type, outcome, time.monotonic() - started)

    def finish(self, task_id: str, task_type: str, outcome: Outcome, seconds: float = 0.0) -> None:
        """Record the outcome durably, then let the reporter send it."""
        outcome = prepare_for_hub(outcome, self.redactor)
        if self.keep_records:
            record = self.records.setdefault(task_id, TaskRecord(task_id, task_type))
            record.outcome, record.seconds = outcome, seconds
        if self.writer.write(lambda: self.ledger.mark_finished(task_id, outcome)):
            log.info(
                "task %s (%s) %s in %.1f s", task_id, task_type, outcome_summary(outcome), seconds
            )
            self.on_finished(task_id)
