"""What a task produced: the result body the hub receives, and any cohort post before it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from trust_poller.redact import TRUNCATED, Redactor

# The hub refuses results longer than this many characters (422, final for that body).
MAX_RESULT_CHARS = 10_000_000
# Failure reasons sent to the hub are capped; the status code travels in its own field.
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Outcome:
    """A finished task: `success` and `result` go to the hub exactly as they are.

    `cohort_post` is a body for POST /cohort/results that must reach the hub before the
    task's own result (cohort_query only).
    """

    success: bool
    result: str | None
    cohort_post: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        return {"success": self.success, "result": self.result}


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATED)] + TRUNCATED


def failure(
    error: str, status_code: int | None = None, cohort_post: dict[str, Any] | None = None
) -> Outcome:
    """A failed task: {"error": reason} plus "status_code" only when an upstream code is known."""
    document: dict[str, Any] = {"error": bounded(error)}
    if status_code is not None:
        document["status_code"] = status_code
    return Outcome(success=False, result=json.dumps(document), cohort_post=cohort_post)


def success(document: Any = None) -> Outcome:
    """A succeeded task; `document` becomes JSON text (None stays null)."""
    return Outcome(success=True, result=None if document is None else json.dumps(document))


def _scrub_json(value: Any, redactor: Redactor) -> Any:
    """Every string scrubbed, keys too; NaN and Infinity, which no JSON body can carry (the
    post would fail forever), become their str() as the protocol does for cohort values."""
    if isinstance(value, str):
        return redactor.scrub(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_scrub_json(item, redactor) for item in value]
    if isinstance(value, dict):
        return {redactor.scrub(key): _scrub_json(item, redactor) for key, item in value.items()}
    return value


def prepare_for_hub(outcome: Outcome, redactor: Redactor) -> Outcome:
    """The one gate every outcome passes before it is stored: no secrets, not too long."""
    result = outcome.result if outcome.result is None else redactor.scrub(outcome.result)
    cohort_post = outcome.cohort_post
    if cohort_post is not None:
        cohort_post = _scrub_json(cohort_post, redactor)
    if result is not None and len(result) > MAX_RESULT_CHARS:
        too_long = failure(
            f"result too large to send: {len(result):,} characters, the hub accepts at most "
            f"{MAX_RESULT_CHARS:,}"
        )
        return replace(too_long, cohort_post=cohort_post)
    return Outcome(outcome.success, result, cohort_post)
