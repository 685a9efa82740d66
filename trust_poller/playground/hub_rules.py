"""What the loopback hub accepts: its request body schemas and its per-key rate limits.

Schemas follow hub-protocol.md strictly (ints are never bools, floats or strings; a health
snapshot carries every documented key and no other), so a client that passes here does
not depend on a real hub being lenient. Problems are listed FastAPI-style for 422 replies.
"""

from __future__ import annotations

import re
import uuid
from collections import deque
from typing import Any

SERVICE_NAME = re.compile(r"[a-z0-9-]{1,32}")
SERVICE_STATUSES = ("healthy", "degraded", "down", "unknown")
MAX_SERVICES = 16
MAX_VERSION_CHARS = 64
MAX_RESPONSE_MS = 1_000_000
MAX_RESULT_CHARS = 10_000_000
WINDOW_SECONDS = 60.0

Problem = dict[str, Any]
Location = tuple[str | int, ...]


def problem(location: Location, message: str, kind: str) -> Problem:
    return {"type": kind, "loc": list(location), "msg": message}


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys(
    value: object, location: Location, required: tuple[str, ...], closed: bool
) -> list[Problem]:
    if not isinstance(value, dict):
        return [problem(location, "Input should be a valid dictionary", "dict_type")]
    problems = [
        problem((*location, key), "Field required", "missing")
        for key in required
        if key not in value
    ]
    if closed:
        problems += [
            problem((*location, key), "Extra inputs are not permitted", "extra_forbidden")
            for key in value
            if key not in required
        ]
    return problems


def _optional_string(value: object, location: Location, max_chars: int | None) -> list[Problem]:
    if value is None:
        return []
    if not isinstance(value, str):
        return [problem(location, "Input should be a valid string", "string_type")]
    if max_chars is not None and len(value) > max_chars:
        return [problem(location, f"String should have at most {max_chars} characters", "too_long")]
    return []


def _service_problems(name: object, entry: object) -> list[Problem]:
    location: Location = ("body", "services", str(name))
    problems = []
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        problems.append(problem(location, "Name should match ^[a-z0-9-]{1,32}$", "string_pattern"))
    found = _keys(entry, location, ("status", "version", "response_ms"), closed=True)
    if found or not isinstance(entry, dict):
        return problems + found
    if entry["status"] not in SERVICE_STATUSES:
        problems.append(
            problem((*location, "status"), f"Input should be one of {SERVICE_STATUSES}", "enum")
        )
    problems += _optional_string(entry["version"], (*location, "version"), MAX_VERSION_CHARS)
    response_ms = entry["response_ms"]
    if response_ms is not None and not (
        _is_int(response_ms) and 0 <= response_ms <= MAX_RESPONSE_MS
    ):
        problems.append(
            problem(
                (*location, "response_ms"),
                f"Input should be an integer from 0 to {MAX_RESPONSE_MS} or null",
                "int_range",
            )
        )
    return problems


def snapshot_problems(snapshot: object) -> list[Problem]:
    """Why a heartbeat's health snapshot is refused; [] when it is accepted."""
    problems = _keys(snapshot, ("body",), ("services", "collected_at"), closed=True)
    if problems or not isinstance(snapshot, dict):
        return problems
    problems = _optional_string(snapshot["collected_at"], ("body", "collected_at"), None)
    services = snapshot["services"]
    if not isinstance(services, dict):
        return [*problems, problem(("body", "services"), "Input should be an object", "dict_type")]
    if not 1 <= len(services) <= MAX_SERVICES:
        problems.append(
            problem(("body", "services"), f"Should have 1 to {MAX_SERVICES} services", "length")
        )
    for name, entry in services.items():
        problems += _service_problems(name, entry)
    return problems


def result_problems(body: object) -> list[Problem]:
    """Why a task result body is refused: {"success": bool, "result": str|null} (≤ 10M chars)."""
    problems = _keys(body, ("body",), ("success", "result"), closed=False)
    if problems or not isinstance(body, dict):
        return problems
    if not isinstance(body["success"], bool):
        problems.append(
            problem(("body", "success"), "Input should be a valid boolean", "bool_type")
        )
    return problems + _optional_string(body["result"], ("body", "result"), MAX_RESULT_CHARS)


def cohort_problems(body: object) -> list[Problem]:
    """Why an OmopCohortResults body is refused (values must already be strings)."""
    required = ("query_id", "trust_id", "created", "record_count", "data")
    problems = _keys(body, ("body",), required, closed=False)
    if problems or not isinstance(body, dict):
        return problems
    for key in ("query_id", "trust_id"):
        if not is_uuid(body[key]):
            problems.append(problem(("body", key), "Input should be a valid UUID", "uuid_parsing"))
    if not isinstance(body["created"], str):
        problems.append(
            problem(("body", "created"), "Input should be a valid string", "string_type")
        )
    if not _is_int(body["record_count"]):
        problems.append(problem(("body", "record_count"), "Input should be an integer", "int_type"))
    problems += _optional_string(body.get("error"), ("body", "error"), None)
    if not isinstance(body.get("suppressed", False), bool):
        problems.append(problem(("body", "suppressed"), "Input should be a boolean", "bool_type"))
    data = body["data"]
    if not isinstance(data, list):
        return [*problems, problem(("body", "data"), "Input should be a valid list", "list_type")]
    for index, field in enumerate(data):
        problems += _cohort_field_problems(field, ("body", "data", index))
    return problems


def _cohort_field_problems(field: object, location: Location) -> list[Problem]:
    problems = _keys(field, location, ("name", "results"), closed=False)
    if problems or not isinstance(field, dict):
        return problems
    if not isinstance(field["name"], str):
        problems.append(
            problem((*location, "name"), "Input should be a valid string", "string_type")
        )
    if not isinstance(field["results"], list):
        return [*problems, problem((*location, "results"), "Input should be a list", "list_type")]
    for index, row in enumerate(field["results"]):
        row_location = (*location, "results", index)
        found = _keys(row, row_location, ("value", "count"), closed=False)
        if found or not isinstance(row, dict):
            problems += found
            continue
        if not isinstance(row["value"], str):
            problems.append(
                problem((*row_location, "value"), "Input should be a valid string", "string_type")
            )
        if not _is_int(row["count"]):
            problems.append(problem((*row_location, "count"), "Input should be an int", "int_type"))
    return problems


class SlidingWindow:
    """At most `per_minute` admissions in any `window` seconds (the hub's minute, shorter only
    for fast tests); refused attempts do not count."""

    def __init__(self, per_minute: float, window: float = WINDOW_SECONDS) -> None:
        if not per_minute > 0:
            raise ValueError("a rate limit must be above 0 per minute")
        self.per_minute = per_minute
        self.window = window
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """None when admitted, else the seconds until the oldest admission leaves the window."""
        while self._admitted and self._admitted[0] <= now - self.window:
            self._admitted.popleft()
        if len(self._admitted) >= self.per_minute:
            return self._admitted[0] + self.window - now
        self._admitted.append(now)
        return None
