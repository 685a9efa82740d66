"""How the hub's certificate is verified: HUB_CA_BUNDLE, else the system trust store.

Verification is always on; REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE are never consulted (the
client passes the store per request, which requests lets win over those variables).
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

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


@functools.lru_cache(maxsize=4)
def trust_context(store: str) -> ssl.SSLContext:
    """One context per CA store, shared by every hub connection of the process: the store is
    parsed once (about 1 MB of memory for the system bundle), not once per connection."""
    if Path(store).is_dir():
        return ssl.create_default_context(capath=store)
    return ssl.create_default_context(cafile=store)


class PinnedTrustAdapter(HTTPAdapter):
    """Verifies the hub with one shared context built from the chosen CA store.

    requests would hand its `verify` path to urllib3, which loads it into a fresh context
    for every new connection; this adapter keeps verification on (CERT_REQUIRED, host name
    checked) but against the shared context only.
    """

    def __init__(self, store: str) -> None:
        self.context = trust_context(store)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, ssl_context=self.context, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return super().proxy_manager_for(proxy, ssl_context=self.context, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        if url.lower().startswith("https"):
            conn.cert_reqs = "CERT_REQUIRED"  # always, whatever `verify` says
            conn.ca_certs = None  # the shared context already holds the store
            conn.ca_cert_dir = None
