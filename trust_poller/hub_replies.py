"""What the hub's replies mean: identities, tasks from a poll, and refusals of a result.

The hub's HTTP itself is spoken only by hub.py; this module reads what came back.
"""

from __future__ import annotations

import enum
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

from trust_poller.errors import HubUnavailable, KeyRejected

log = logging.getLogger("trust_poller.hub")

# Task types are short names; a longer one is refused, and never copied whole into logs.
MAX_TASK_TYPE_CHARS = 100
_409_STATUS = re.compile(r"status:\s*([A-Z_]+)")


class HubError(HubUnavailable):
    """No usable answer from the hub (transport, timeout, 5xx, 429, not the hub's JSON)."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after

    @property
    def reply_unusable(self) -> bool:
        """A 200 reply arrived but could not be used (too large, too slow, cut off, not JSON,
        wrong shape): for a poll, the hub has already marked its tasks IN_PROGRESS."""
        return self.status == 200


class HubRateLimited(HubError):
    """429: the key's budget is spent (another host may be polling with this kit)."""


class HubKeyRejected(KeyRejected):
    """401 (or 403 outside result posts): the hub does not accept this kit's API key."""


class SnapshotRejected(Exception):
    """422 on a heartbeat with a health snapshot: nothing was recorded."""


class Halted(Exception):
    """The daemon is stopping now; the request was not sent."""


@dataclass(frozen=True)
class Identity:
    trust_id: str
    trust_name: str


@dataclass(frozen=True)
class HeartbeatReply:
    identity: Identity
    hub_version: str | None
    hub_key_fingerprint: str | None


@dataclass(frozen=True)
class PendingTask:
    """One task from a poll; `problem` says why it cannot be run (it is failed, not dropped)."""

    id: str
    task_type: str
    payload: object
    created_at: str | None
    problem: str | None = None


class Answer(enum.Enum):
    ACKNOWLEDGED = "acknowledged"
    RETIRED = "retired"
    AWAIT_REDELIVERY = "await-redelivery"
    BODY_REFUSED = "body-refused"


@dataclass(frozen=True)
class ReportReply:
    answer: Answer
    detail: str


def read_refusal(status: int, detail: str) -> ReportReply:
    """The protocol page's "What a refusal means", for a reply that is the hub's own JSON."""
    if status == 200:
        return ReportReply(Answer.ACKNOWLEDGED, "result recorded")
    if status == 409:
        match = _409_STATUS.search(detail)
        current = match.group(1) if match else ""
        if current == "PENDING":
            return ReportReply(Answer.AWAIT_REDELIVERY, detail)
        if current in ("COMPLETED", "FAILED", "CANCELLED"):
            return ReportReply(Answer.RETIRED, detail)
        raise HubError(f"result: 409 without a final status ({detail})", status=409)
    if status in (403, 404):
        return ReportReply(Answer.RETIRED, f"{status}: {detail}")
    if status == 422:
        return ReportReply(Answer.BODY_REFUSED, detail)
    raise HubError(f"result: unexpected HTTP {status}", status=status)


def identity_of(document: Any, what: str, *, status: int | None = None) -> Identity:
    trust_id, trust_name = document.get("trust_id"), document.get("trust_name")
    if not is_text(trust_id) or not is_text(trust_name):
        raise HubError(f"{what}: reply carries no trust_id/trust_name", status=status)
    return Identity(trust_id, trust_name)


def is_text(value: object) -> TypeGuard[str]:
    """A string that UTF-8 can carry: JSON may hold lone surrogates ("\\ud800"), which no
    log line, state database or request body can."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def as_text(value: str) -> str:
    return value if is_text(value) else value.encode(errors="backslashreplace").decode()


def parse_tasks(items: list[Any]) -> list[PendingTask]:
    """Every item with a usable id becomes a task (a broken one is failed with a reason)."""
    tasks: list[PendingTask] = []
    seen: set[str] = set()
    for position, item in enumerate(items):
        raw_id = item.get("id") if isinstance(item, dict) else None
        try:
            task_id = str(uuid.UUID(raw_id)) if isinstance(raw_id, str) else None
        except ValueError:
            task_id = None
        if task_id is None:
            log.error("poll: task #%d has no usable id and cannot be run or reported", position)
            continue
        if task_id in seen:
            log.warning("poll: task %s appears twice in one reply; running it once", task_id)
            continue
        seen.add(task_id)
        task_type = item.get("task_type")
        created_at = item.get("created_at")
        payload = item.get("payload")
        problem = None
        if not isinstance(task_type, str) or not task_type:
            problem, task_type = "task has no task_type", ""
        elif not is_text(task_type):
            problem = "task_type is not valid text (it holds a lone UTF-16 surrogate)"
            task_type = as_text(task_type[:MAX_TASK_TYPE_CHARS])
        elif len(task_type) > MAX_TASK_TYPE_CHARS:
            problem = f"task_type is too long to be a task type ({len(task_type):,} characters)"
            task_type = task_type[:MAX_TASK_TYPE_CHARS]
        elif "payload" not in item:
            problem = "task has no payload"
        tasks.append(
            PendingTask(
                task_id,
                task_type,
                as_text(payload) if isinstance(payload, str) else payload,
                as_text(created_at) if isinstance(created_at, str) else None,
                problem,
            )
        )
    return tasks
