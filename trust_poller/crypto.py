"""How a task payload is opened (and, for the loopback hub and tests, sealed).

Envelope: standard base64 of the JSON text {"v": 1, "kid": "shared", "iv": b64, "ct": b64},
AES-256-GCM with associated data ``FLIP|v1|<kid>|<context>``; a task's context is
``task:<task_type>``, so a payload sealed for one task type never opens under another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from trust_poller.errors import PayloadRejected

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENVELOPE_VERSION = 1
KEY_ID = "shared"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


def task_context(task_type: str) -> str:
    return f"task:{task_type}"


def associated_data(kid: str, context: str) -> bytes:
    return f"FLIP|v{ENVELOPE_VERSION}|{kid}|{context}".encode()


def key_fingerprint(key: bytes) -> str:
    """First 12 hex characters of SHA-256 over the raw key bytes, as the hub shows it."""
    return hashlib.sha256(key).hexdigest()[:12]


def cohort_admin_key(aes_key_base64_text: str) -> str:
    """The `X-Cohort-Admin-Key` data-access-api expects: SHA-256 of the base64 *text*."""
    return hashlib.sha256(aes_key_base64_text.encode()).hexdigest()


def _cipher(key: bytes) -> AESGCM:
    # Imported at the first payload, not at start-up: cryptography's Rust core adds about
    # 6.5 MiB to the resident size of a daemon that has not been handed a task yet.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def seal_envelope(key: bytes, plaintext: bytes, context: str, nonce: bytes | None = None) -> str:
    """Seal as the hub does (used by the loopback hub and the tests)."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    sealed = _cipher(key).encrypt(nonce, plaintext, associated_data(KEY_ID, context))
    body = {
        "v": ENVELOPE_VERSION,
        "kid": KEY_ID,
        "iv": base64.b64encode(nonce).decode(),
        "ct": base64.b64encode(sealed).decode(),
    }
    return base64.b64encode(json.dumps(body).encode()).decode()


def _strict_b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise PayloadRejected(f"payload is not an envelope: {what} is not base64") from None


def open_envelope(key: bytes, envelope: object, context: str) -> bytes:
    """Return the plaintext, or raise PayloadRejected naming the reason (never the key)."""
    if not isinstance(envelope, str):
        raise PayloadRejected("payload is not an envelope: not a string")
    raw = _strict_b64decode(envelope, "payload")
    try:
        fields: Any = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise PayloadRejected("payload is not an envelope: not JSON") from None
    if not isinstance(fields, dict):
        raise PayloadRejected("payload is not an envelope: not a JSON object")
    version = fields.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PayloadRejected("payload is not an envelope: 'v' missing or not an integer")
    for name in ("kid", "iv", "ct"):
        if not isinstance(fields.get(name), str):
            raise PayloadRejected(f"payload is not an envelope: '{name}' missing or not a string")
    if version != ENVELOPE_VERSION:
        raise PayloadRejected(f"unsupported envelope version {version}")
    kid = fields["kid"]
    if kid != KEY_ID:
        raise PayloadRejected(f"unknown key id {kid[:40]!r}")
    nonce = _strict_b64decode(fields["iv"], "iv")
    if len(nonce) != NONCE_BYTES:
        raise PayloadRejected(f"nonce is {len(nonce)} bytes, expected {NONCE_BYTES}")
    sealed = _strict_b64decode(fields["ct"], "ct")
    if len(sealed) < TAG_BYTES:
        raise PayloadRejected("payload failed authentication (ciphertext shorter than its tag)")
    from cryptography.exceptions import InvalidTag

    try:
        return _cipher(key).decrypt(nonce, sealed, associated_data(kid, context))
    except (InvalidTag, ValueError):
        raise PayloadRejected(
            "payload failed authentication (tampered, sealed for another task type, "
            "or the kit's AES key differs from the hub's)"
        ) from None


def open_task_payload(key: bytes, task_type: str, envelope: object) -> dict[str, Any]:
    """Open a task payload and parse it as a JSON object."""
    plaintext = open_envelope(key, envelope, task_context(task_type))
    try:
        payload: Any = json.loads(plaintext)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PayloadRejected("payload plaintext is not JSON") from None
    if not isinstance(payload, dict):
        raise PayloadRejected("payload plaintext is not a JSON object")
    return payload
