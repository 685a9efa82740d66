"""How a decrypted task payload is checked before any handler calls a service.

Each check names the field and what it must be; the handler turns `InvalidPayload` into a
failed task ("invalid payload: field 'x' must be a string (it is missing)") and makes no call.
"""

from __future__ import annotations

import re
from typing import Any

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_EMAIL = re.compile(r"^[^@\s\"<>()\[\],;:]+@[^@\s\"<>()\[\],;:]+\.[^@\s\"<>()\[\],;:.]+$")
_MAX_EMAIL_CHARS = 254
_MISSING = object()


class InvalidPayload(ValueError):
    """A payload field is missing or has the wrong type or form."""


# Real hub and service documents nest a handful of levels. Much deeper ones are refused where
# they are read, before any recursive code (str(), json.dumps, scrubbing) meets its limit.
MAX_JSON_DEPTH = 64


def nested_too_deep(document: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when a parsed JSON document nests lists/objects more than `limit` levels deep."""
    level = [document]
    for _ in range(limit):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return False
    return any(isinstance(node, dict | list) for node in level)


def describe(value: object) -> str:
    """A JSON-flavoured name of a value's type, for error texts (never the value itself)."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong(name: str, expected: str, value: object) -> InvalidPayload:
    return InvalidPayload(f"field '{name}' must be {expected} (it is {describe(value)})")


def string(payload: dict[str, Any], key: str, *, where: str = "") -> str:
    """A required, non-empty string."""
    name = where + key
    value = payload.get(key, _MISSING)
    if not isinstance(value, str):
        raise _wrong(name, "a string", value)
    if not value.strip():
        raise InvalidPayload(f"field '{name}' must not be empty")
    return value


def optional_string(payload: dict[str, Any], key: str) -> str | None:
    """A string or null; an absent field counts as null."""
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise _wrong(key, "a string or null", value)
    return value


def uuid_text(payload: dict[str, Any], key: str, *, where: str = "") -> str:
    """A required UUID in its canonical 8-4-4-4-12 form, returned as given."""
    value = payload.get(key, _MISSING)
    if not isinstance(value, str) or not _UUID.match(value):
        shown = "a string that is not a UUID" if isinstance(value, str) else describe(value)
        raise InvalidPayload(f"field '{where}{key}' must be a UUID (it is {shown})")
    return value


def boolean(
    payload: dict[str, Any], key: str, *, default: bool | None = None, where: str = ""
) -> bool:
    """A required boolean, or `default` when the field is absent (null is not absent)."""
    value = payload.get(key, _MISSING)
    if value is _MISSING and default is not None:
        return default
    if not isinstance(value, bool):
        raise _wrong(where + key, "true or false", value)
    return value


def email(payload: dict[str, Any], key: str, *, where: str = "") -> str:
    """A required string that looks like an e-mail address (local@domain.tld)."""
    value = string(payload, key, where=where)
    if len(value) > _MAX_EMAIL_CHARS or not _EMAIL.match(value):
        raise InvalidPayload(f"field '{where}{key}' must be an e-mail address")
    return value


def array(payload: dict[str, Any], key: str) -> list[Any]:
    value = payload.get(key, _MISSING)
    if not isinstance(value, list):
        raise _wrong(key, "an array", value)
    return value


def create_imaging_body(payload: dict[str, Any]) -> dict[str, Any]:
    """The create_imaging payload, checked, with `is_disabled` and `dicom_to_nifti` filled in."""
    uuid_text(payload, "project_id")
    uuid_text(payload, "trust_id")
    string(payload, "project_name")
    body = dict(payload)
    body["query"] = optional_string(payload, "query")
    users = []
    for index, user in enumerate(array(payload, "users")):
        where = f"users[{index}]."
        if not isinstance(user, dict):
            raise _wrong(f"users[{index}]", "an object", user)
        uuid_text(user, "id", where=where)
        email(user, "email", where=where)
        users.append(
            {**user, "is_disabled": boolean(user, "is_disabled", default=False, where=where)}
        )
    body["users"] = users
    body["dicom_to_nifti"] = boolean(payload, "dicom_to_nifti", default=True)
    return body
