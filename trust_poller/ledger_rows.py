"""One ledger row: the task states, the entry a row becomes, and the checks on reading it.

A row that fails a check is damaged (a torn write is impossible, but a disk or a hand can
corrupt it); the ledger quarantines it instead of crashing.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trust_poller.outcome import Outcome


class TaskState(enum.StrEnum):
    CLAIMED = "claimed"
    STARTED = "started"
    FINISHED = "finished"
    ACKNOWLEDGED = "acknowledged"
    RETIRED = "retired"


@dataclass(frozen=True)
class ClaimedTask:
    id: str
    task_type: str
    envelope: str
    created_at: str | None = None


@dataclass(frozen=True)
class LedgerEntry:
    id: str
    task_type: str
    envelope: str
    state: TaskState
    interruptions: int
    outcome: Outcome | None
    cohort_pending: bool
    awaiting_redelivery: bool
    deliveries: int
    claimed_at: float
    updated_at: float
    note: str | None


class BadRow(Exception):
    """A row read from disk that fails its checks; the message says which column."""


def need(value: Any, kind: type | tuple[type, ...], column: str, optional: bool = False) -> Any:
    if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise BadRow(f"{column} is {value!r}")


def _flag(value: Any, column: str) -> bool:
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRow(f"{column} is {value!r}")


def entry_from_row(row: Sequence[Any]) -> LedgerEntry:
    """A row as read from disk, checked; a damaged one raises BadRow with the reason."""
    _, task_id, task_type, envelope, state, interruptions, success, result, cohort_post = row[:9]
    try:
        task_state = TaskState(state)
    except ValueError:
        raise BadRow(f"state is {state!r}") from None
    outcome = None
    if success is not None:
        try:
            post = None if cohort_post is None else json.loads(need(cohort_post, str, "post"))
        except ValueError as error:
            raise BadRow(f"cohort_post is not JSON: {error}") from None
        post = need(post, dict, "cohort_post", optional=True)
        outcome = Outcome(_flag(success, "success"), need(result, str, "result", True), post)
    elif result is not None or cohort_post is not None:
        raise BadRow("a result is stored without its success flag")
    if outcome is None and task_state in (TaskState.FINISHED, TaskState.ACKNOWLEDGED):
        raise BadRow(f"state is {state} but no outcome is stored")
    return LedgerEntry(
        id=need(task_id, str, "id"),
        task_type=need(task_type, str, "task_type"),
        envelope=need(envelope, str, "envelope"),
        state=task_state,
        interruptions=need(interruptions, int, "interruptions"),
        outcome=outcome,
        cohort_pending=_flag(row[9], "cohort_pending"),
        awaiting_redelivery=_flag(row[10], "awaiting_redelivery"),
        deliveries=need(row[11], int, "deliveries"),
        claimed_at=float(need(row[12], (int, float), "claimed_at")),
        updated_at=float(need(row[13], (int, float), "updated_at")),
        note=need(row[14], str, "note", optional=True),
    )


def outcome_columns(outcome: Outcome) -> tuple[int, str | None, str | None]:
    post = None if outcome.cohort_post is None else json.dumps(outcome.cohort_post)
    return int(outcome.success), outcome.result, post
