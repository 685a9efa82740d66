"""How the hub's certificate is verified: HUB_CA_BUNDLE, else the system trust store.

Verification is always on; REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE are never consulted (the
client passes the store per request, which requests lets win over those variables).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import requests

_OS_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


def system_trust_store() -> str:
    """The operating system's CA store, where hospitals install their inspection CAs."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, *_OS_BUNDLES, paths.capath):
        if candidate and Path(candidate).exists():
            return candidate
    return requests.utils.DEFAULT_CA_BUNDLE_PATH


def tls_failure(exc: BaseException, verify: str, *, from_kit: bool) -> str:
    """Why verifying the hub failed, against which CA store, and the fix (never a bypass)."""
    reason = "the TLS handshake failed"
    pending: list[object] = [exc]
    for _ in range(16):  # requests wraps urllib3 wraps ssl; the bound only guards against cycles
        if not pending:
            break
        current = pending.pop(0)
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {current.verify_message or current.reason}"
            break
        if isinstance(current, ssl.SSLError) and current.reason:
            reason = f"TLS error: {current.reason}"
        if isinstance(current, BaseException):
            pending.extend(current.args)
            pending.extend(x for x in (current.__cause__, current.__context__) if x is not None)
            pending.append(getattr(current, "reason", None))
    if from_kit:
        store = f"HUB_CA_BUNDLE {verify}"
    else:
        store = (
            f"the system trust store {verify} (HUB_CA_BUNDLE is not set; REQUESTS_CA_BUNDLE "
            "and CURL_CA_BUNDLE are never used)"
        )
    return (
        f"TLS verification of the hub failed ({reason}) against {store}; fix: set "
        "HUB_CA_BUNDLE in the kit to the CA that signed the hub's certificate, or install "
        "that CA in the system trust store"
    )
