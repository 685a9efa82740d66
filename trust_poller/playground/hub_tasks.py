"""The loopback hub's task table and its lifecycle, as hub-protocol.md describes it.

PENDING → (poll) IN_PROGRESS → (result) COMPLETED | FAILED; the reaper sends a task left
IN_PROGRESS back to PENDING (retry_count + 1) and fails it after 3 re-queues, so one task
id can be delivered up to 4 times. The table has no lock: the hub holds its own around it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

PENDING = "PENDING"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
MAX_REQUEUES = 3
REQUEUE_LIMIT_RESULT = json.dumps({"error": f"Exceeded maximum retries ({MAX_REQUEUES})"})


def canonical_id(identifier: str) -> str:
    """UUIDs compare case-insensitively, as the hub parses them; other ids as they are."""
    try:
        return str(uuid.UUID(identifier))
    except ValueError:
        return identifier


@dataclass
class TaskSnapshot:
    """A task as the hub's table holds it (times are time.monotonic())."""

    id: str
    task_type: str
    payload: str
    trust_id: str
    status: str
    enqueued_at: float
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    success: bool | None = None
    result: str | None = None
    deliveries: int = 0
    retry_count: int = 0
    delivered_at: float | None = None
    finished_at: float | None = None
    # Every body posted for this task (parsed JSON, or the raw bytes), refused ones too.
    results_received: list[Any] = field(default_factory=list)

    def wire_form(self) -> dict[str, str]:
        """The task as GET /tasks/pending lists it."""
        return {
            "id": self.id,
            "task_type": self.task_type,
            "payload": self.payload,
            "created_at": self.created_at,
        }


class TaskTable:
    def __init__(self) -> None:
        self._tasks: dict[str, TaskSnapshot] = {}

    def add(self, task: TaskSnapshot) -> None:
        key = canonical_id(task.id)
        if key in self._tasks:
            raise ValueError(f"task {task.id} is already queued")
        self._tasks[key] = task

    def find(self, task_id: str) -> TaskSnapshot | None:
        """The live task (mutable), or None."""
        return self._tasks.get(canonical_id(task_id))

    def copy_of(self, task_id: str) -> TaskSnapshot:
        """A copy safe to hand to a test; KeyError when unknown."""
        task = self._tasks[canonical_id(task_id)]
        return replace(task, results_received=list(task.results_received))

    def copies(self) -> list[TaskSnapshot]:
        return [self.copy_of(task.id) for task in self._tasks.values()]

    def claim(self, trust_id: str, limit: int, now: float) -> list[TaskSnapshot]:
        """Hand out up to `limit` of the trust's PENDING tasks, oldest first."""
        claimed = [
            task
            for task in self._tasks.values()
            if task.status == PENDING and canonical_id(task.trust_id) == canonical_id(trust_id)
        ][:limit]
        for task in claimed:
            task.status, task.delivered_at = IN_PROGRESS, now
            task.deliveries += 1
        return claimed

    def reap(self, older_than: float, now: float) -> int:
        """Re-queue tasks IN_PROGRESS for `older_than` seconds, failing them after 3 re-queues."""
        touched = 0
        for task in self._tasks.values():
            delivered_at = task.delivered_at if task.delivered_at is not None else now
            if task.status != IN_PROGRESS or now - delivered_at < older_than:
                continue
            touched += 1
            if task.retry_count >= MAX_REQUEUES:
                task.status, task.success, task.finished_at = FAILED, False, now
                task.result = REQUEUE_LIMIT_RESULT
            else:
                task.status = PENDING
                task.retry_count += 1
        return touched
