"""How the kit is read: a dotenv file becomes one frozen, validated `Kit`.

The file is read with python-dotenv without interpolation and without touching os.environ.
Unknown keys (real FLIP kits carry many) are ignored. Every problem raises `KitError`
naming the key, the file and the fix.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from trust_poller import crypto
from trust_poller.errors import KitError

log = logging.getLogger(__name__)

DEFAULT_KIT_PATH = Path("/etc/trust-poller/kit.env")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_UNSAFE_SECRET_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Kit:
    """Everything trust-poller takes from the kit file, validated."""

    path: Path
    hub_url: str
    api_key: str = field(repr=False)
    api_key_header: str
    aes_key: bytes = field(repr=False)
    aes_key_base64: str = field(repr=False)
    internal_service_key: str = field(repr=False)
    internal_service_key_header: str = "X-Trust-Internal-Service-Key"
    expected_trust_id: uuid.UUID | None = None
    poll_interval: float = 5.0
    heartbeat_interval: float = 5.0
    data_access_api_url: str = "http://data-access-api:8000"
    imaging_api_url: str = "http://imaging-api:8000"
    xnat_url: str = "http://xnat-web:8080"
    omop_db_host: str = "omop-db"
    omop_db_port: int = 5432
    cohort_query_timeout: float = 300.0
    internal_request_timeout: float = 30.0
    health_collect_interval: float = 30.0
    health_probe_degraded_ms: int = 1000
    max_concurrent_tasks: int = 4
    max_concurrent_queries: int = 1
    hub_heartbeats_per_minute: float = 30.0
    hub_polls_per_minute: float = 30.0
    hub_results_per_minute: float = 60.0
    hub_rate_window: float = 60.0
    drain_timeout: float = 30.0
    hub_ca_bundle: Path | None = None

    @property
    def key_fingerprint(self) -> str:
        return crypto.key_fingerprint(self.aes_key)

    @property
    def cohort_admin_key(self) -> str:
        return crypto.cohort_admin_key(self.aes_key_base64)

    def secrets(self) -> tuple[str, ...]:
        """Every secret value a log line or a result must never show."""
        return (
            self.api_key,
            self.internal_service_key,
            self.aes_key_base64,
            self.cohort_admin_key,
        )


class _Reader:
    """Validates one raw key/value mapping, naming the file in every error."""

    def __init__(self, path: Path, values: dict[str, str | None]) -> None:
        self.path = path
        self.values = values

    def fail(self, key: str, problem: str, fix: str) -> KitError:
        return KitError(key, str(self.path), problem, fix)

    def optional(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def required(self, key: str) -> str:
        value = self.optional(key)
        if value is None:
            raise self.fail(key, "missing or empty", f"set {key}=... (see kit.example)")
        return value

    def secret(self, key: str) -> str:
        value = self.required(key)
        if _UNSAFE_SECRET_CHAR.search(value):
            raise self.fail(
                key,
                "contains whitespace or control characters",
                "copy the value again from the original kit, without spaces or line breaks",
            )
        return value

    def header_name(self, key: str, default: str | None = None) -> str:
        value = self.optional(key) or default
        if value is None:
            raise self.fail(key, "missing or empty", f"set {key}=Authorization (see kit.example)")
        if not _HEADER_NAME.match(value):
            raise self.fail(key, "is not a valid HTTP header name", "use a name like Authorization")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        text = self.optional(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise self.fail(
                key, f"{text!r} is not a number", f"set {key} to e.g. {default:g}"
            ) from None
        if not value > minimum or value != value or value == float("inf"):
            raise self.fail(
                key, f"must be a number above {minimum:g}", f"set {key} to e.g. {default:g}"
            )
        return value

    def integer(self, key: str, default: int, *, minimum: int = 1, maximum: int = 65535) -> int:
        text = self.optional(key)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise self.fail(
                key, f"{text!r} is not a whole number", f"set {key} to e.g. {default}"
            ) from None
        if not minimum <= value <= maximum:
            raise self.fail(
                key, f"must be between {minimum} and {maximum}", f"set {key} to e.g. {default}"
            )
        return value

    def service_url(self, key: str, default: str) -> str:
        url = (self.optional(key) or default).rstrip("/")
        parts = urlsplit(url)
        # Checked before anything that echoes the URL, so no message ever carries a password
        # (urlsplit finds no user in "user:pass@host:8000", hence the plain "@" test).
        if "@" in url:
            raise self.fail(key, "carries credentials in the URL", "remove user:password@ from it")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(key, f"{url!r} is not an http(s) URL", f"set {key}=http://HOST:PORT")
        return url

    def hub_url(self) -> str:
        key = "CENTRAL_HUB_API_URL"
        url = self.required(key).rstrip("/")
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise self.fail(key, "carries credentials in the URL", "remove user:password@ from it")
        if parts.query or parts.fragment or not parts.hostname:
            raise self.fail(
                key, "is not a plain base URL", "set it like https://hub.example.org/api"
            )
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise self.fail(
                key,
                "uses plain http:// to a host that is not loopback",
                "use https:// (plain http is only allowed for 127.0.0.0/8, localhost, [::1])",
            )
        if parts.scheme not in ("http", "https"):
            raise self.fail(key, f"scheme {parts.scheme!r} is not https", "use https://HOST/api")
        if not parts.path.endswith("/api"):
            log.warning(
                "%s in %s does not end in /api; hub paths are appended to it", key, self.path
            )
        return url

    def aes_key(self) -> tuple[bytes, str]:
        key = "AES_KEY_BASE64"
        text = self.secret(key)
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise self.fail(
                key, "is not standard base64", "copy it again from the hub's kit"
            ) from None
        if len(raw) != crypto.KEY_BYTES:
            raise self.fail(
                key,
                f"decodes to {len(raw)} bytes, AES-256 needs exactly 32",
                "copy the 44-character key from the hub's kit",
            )
        return raw, text

    def expected_trust_id(self) -> uuid.UUID | None:
        key = "EXPECTED_TRUST_ID"
        text = self.optional(key)
        if text is None:
            return None
        try:
            return uuid.UUID(text)
        except ValueError:
            raise self.fail(
                key,
                f"{text[:60]!r} is not a UUID",
                "set it to the trust id the hub shows, or leave it empty",
            ) from None

    def ca_bundle(self) -> Path | None:
        key = "HUB_CA_BUNDLE"
        text = self.optional(key)
        if text is None:
            return None
        bundle = Path(text)
        if not os.access(bundle, os.R_OK):
            raise self.fail(
                key,
                f"{bundle} does not exist or is not readable",
                "point it at a PEM file or a c_rehash'd directory",
            )
        if bundle.is_file():
            try:
                ssl.create_default_context(cafile=str(bundle))
            except (ssl.SSLError, ValueError):
                raise self.fail(
                    key,
                    f"{bundle} holds no usable CA certificate",
                    "point it at the PEM file of the CA that signed the hub's certificate",
                ) from None
        return bundle


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_kit_values(path: Path) -> dict[str, str | None]:
    """Read the raw key/values (BOM and CRLF tolerated), warning about duplicates and bad lines."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise KitError(
            None, str(path), "kit file not found", "put the trust's kit there, or pass --kit PATH"
        ) from None
    except PermissionError:
        raise KitError(
            None,
            str(path),
            "kit file is not readable by this user",
            "run as the service user, or fix its owner",
        ) from None
    except IsADirectoryError:
        raise KitError(
            None, str(path), "is a directory, not a kit file", "pass --kit PATH/TO/kit.env"
        ) from None
    except UnicodeDecodeError:
        raise KitError(None, str(path), "kit file is not UTF-8 text", "save it as UTF-8") from None
    except OSError as exc:
        raise KitError(
            None,
            str(path),
            f"kit file cannot be read ({exc.strerror})",
            "check the path and its disk",
        ) from None
    text = text.replace("\r\n", "\n")
    lines_by_key: dict[str, list[int]] = {}
    line_number = 1
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            log.warning("%s line %d cannot be parsed and is ignored", path, line_number)
        elif binding.key is not None:
            lines_by_key.setdefault(binding.key, []).append(line_number)
        line_number += binding.original.string.count("\n")
    for key, lines in lines_by_key.items():
        if len(lines) > 1:
            log.warning(
                "%s appears %d times in %s (lines %s); the last one (line %d) wins",
                key,
                len(lines),
                path,
                ", ".join(map(str, lines)),
                lines[-1],
            )
    quiet = logging.getLogger("dotenv.main")
    previous = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return dict(dotenv_values(stream=io.StringIO(text), interpolate=False))
    finally:
        quiet.setLevel(previous)


def check_kit_permissions(path: Path) -> None:
    """Refuse a kit others can write; warn when group or others can read it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IWOTH:
        raise KitError(None, str(path), "kit file is writable by others", f"run: chmod 600 {path}")
    if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP):
        log.warning("kit %s is readable by group or others; run: chmod 600 %s", path, path)


def load_kit(path: Path, *, check_permissions: bool = True) -> Kit:
    """Read and validate the kit; raise KitError with the key, file and fix.

    `check_permissions=False` is for systemd's credential copy, whose mode is systemd's
    (the CLI checks the source file instead).
    """
    if check_permissions:
        check_kit_permissions(path)
    reader = _Reader(path, read_kit_values(path))
    aes_key, aes_text = reader.aes_key()
    poll_interval = reader.number("POLL_INTERVAL_SECONDS", 5.0)
    return Kit(
        path=path,
        hub_url=reader.hub_url(),
        api_key=reader.secret("TRUST_API_KEY"),
        api_key_header=reader.header_name("TRUST_API_KEY_HEADER"),
        aes_key=aes_key,
        aes_key_base64=aes_text,
        internal_service_key=reader.secret("TRUST_INTERNAL_SERVICE_KEY"),
        internal_service_key_header=reader.header_name(
            "TRUST_INTERNAL_SERVICE_KEY_HEADER", "X-Trust-Internal-Service-Key"
        ),
        expected_trust_id=reader.expected_trust_id(),
        poll_interval=poll_interval,
        heartbeat_interval=reader.number("HEARTBEAT_INTERVAL_SECONDS", poll_interval),
        data_access_api_url=reader.service_url(
            "DATA_ACCESS_API_URL", "http://data-access-api:8000"
        ),
        imaging_api_url=reader.service_url("IMAGING_API_URL", "http://imaging-api:8000"),
        xnat_url=reader.service_url("XNAT_URL", "http://xnat-web:8080"),
        omop_db_host=reader.optional("OMOP_DB_HOST") or "omop-db",
        omop_db_port=reader.integer("OMOP_DB_PORT", 5432),
        cohort_query_timeout=reader.number("COHORT_QUERY_TIMEOUT_SECONDS", 300.0),
        internal_request_timeout=reader.number("INTERNAL_REQUEST_TIMEOUT_SECONDS", 30.0),
        health_collect_interval=reader.number("HEALTH_COLLECT_INTERVAL_SECONDS", 30.0),
        health_probe_degraded_ms=reader.integer(
            "HEALTH_PROBE_DEGRADED_MS", 1000, maximum=1_000_000
        ),
        max_concurrent_tasks=reader.integer("MAX_CONCURRENT_TASKS", 4, maximum=64),
        max_concurrent_queries=reader.integer("MAX_CONCURRENT_QUERIES", 1, maximum=64),
        hub_heartbeats_per_minute=reader.number("HUB_HEARTBEATS_PER_MINUTE", 30.0),
        hub_polls_per_minute=reader.number("HUB_POLLS_PER_MINUTE", 30.0),
        hub_results_per_minute=reader.number("HUB_RESULTS_PER_MINUTE", 60.0),
        hub_rate_window=reader.number("HUB_RATE_WINDOW_SECONDS", 60.0),
        drain_timeout=reader.number("DRAIN_TIMEOUT_SECONDS", 30.0),
        hub_ca_bundle=reader.ca_bundle(),
    )


def warn_unresolvable_hosts(kit: Kit) -> list[str]:
    """Warn, naming the key, about internal hosts that do not resolve (compose-era kits)."""
    checks = {
        "DATA_ACCESS_API_URL": urlsplit(kit.data_access_api_url).hostname,
        "IMAGING_API_URL": urlsplit(kit.imaging_api_url).hostname,
        "XNAT_URL": urlsplit(kit.xnat_url).hostname,
        "OMOP_DB_HOST": kit.omop_db_host,
    }
    unresolved = []
    for key, host in checks.items():
        if not host:
            continue
        try:
            socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            unresolved.append(key)
            log.warning(
                "%s host %r in %s does not resolve from this host; compose-era kits name "
                "container hosts — point it at the service's real address",
                key,
                host,
                kit.path,
            )
    return unresolved
