"""Start-up recovery: what a crash or a stop left in the state directory, handled safely.

Claimed tasks run; interrupted ones run again when that is safe; an interrupted
`create_imaging` is reported failed (never re-run); a task interrupted too often is poison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from trust_poller import crypto
from trust_poller.dispatch import StateWriter, TaskRunner
from trust_poller.errors import PayloadRejected
from trust_poller.kit import Kit
from trust_poller.ledger import Ledger, LedgerEntry, TaskState
from trust_poller.outcome import bounded, failure
from trust_poller.workers import Job

log = logging.getLogger("trust_poller.poller")

MAX_INTERRUPTIONS = 3


@dataclass(frozen=True)
class Recovery:
    kit: Kit
    ledger: Ledger
    runner: TaskRunner
    writer: StateWriter
    submit: Callable[[Job], None]

    def recover(self) -> bool:
        """Run what was claimed, re-run what was interrupted (unless unsafe); True when
        results wait to be sent. What was found is logged by Ledger.open."""
        claimed = self.ledger.in_state(TaskState.CLAIMED)
        started = self.ledger.in_state(TaskState.STARTED)
        unsent = self.ledger.unsent()
        for entry in claimed:
            self.submit(self.runner.job(entry.id, entry.task_type, entry.envelope))
        for entry in started:
            self._resume_interrupted(entry)
        return bool(unsent)

    def _resume_interrupted(self, entry: LedgerEntry) -> None:
        counted: list[int] = []
        if not self.writer.write(lambda: counted.append(self.ledger.note_interrupted(entry.id))):
            return
        interruptions = counted[0]
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
            self.runner.finish(entry.id, entry.task_type, failure(self._interrupted_create(entry)))
        else:
            log.warning(
                "task %s (%s) was interrupted; running it again (it is safe to repeat)",
                entry.id,
                entry.task_type,
            )
            self.submit(self.runner.job(entry.id, entry.task_type, entry.envelope))

    def _interrupted_create(self, entry: LedgerEntry) -> str:
        """The operator-facing reason for an interrupted create_imaging, naming the project."""
        project = "the project"
        try:
            payload = crypto.open_task_payload(self.kit.aes_key, entry.task_type, entry.envelope)
        except PayloadRejected:
            payload = {}
        name, project_id = payload.get("project_name"), payload.get("project_id")
        if isinstance(name, str) and isinstance(project_id, str):
            project = f"project {bounded(name, 200)!r} (hub project {bounded(project_id, 80)})"
        return (
            "create_imaging was interrupted while running (trust-poller stopped or crashed) "
            f"and was not run again: {project} may be partly created in XNAT and its users "
            "may have been e-mailed their credentials — check XNAT / imaging-api for it "
            "before creating it again"
        )
