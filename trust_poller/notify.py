"""How systemd hears from us: the sd_notify datagram protocol, in the standard library.

Follows sd_notify(3) and systemd's MIT-0 `notify-selfcontained-example.py`: one AF_UNIX
datagram of newline-separated KEY=VALUE lines per message. Outside systemd (no NOTIFY_SOCKET)
every call is a silent no-op. Sending never raises: a daemon must not die because systemd
could not be told something.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A datagram to systemd's socket should never block; if it does, give up rather than stall.
_SEND_TIMEOUT_SECONDS = 5.0


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class SystemdNotifier:
    """Sends readiness, status, watchdog and stopping notifications to systemd."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        """`address` is a socket path, or an abstract name starting with a NUL character."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._lock = threading.Lock()
        self._failure_warned = False
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (default: os.environ)."""
        env = os.environ if environ is None else environ
        return cls(_socket_address(env.get("NOTIFY_SOCKET", "")), _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec=), or None when not asked for."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def alive(self, status: str) -> bool:
        """One turn of the main loop: WATCHDOG=1 when systemd asked for pings, and STATUS=
        when its text changed (each change is a D-Bus signal), in one datagram."""
        text = _one_line(status)
        lines = [] if self._watchdog_usec is None else ["WATCHDOG=1"]
        if text != self._last_status:
            lines.append(f"STATUS={text}")
        if not lines or not self.send(*lines):
            return False
        self._last_status = text
        return True

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd's start/stop timeout kills us."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def send(self, *lines: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True if it was delivered to the socket."""
        if self._address is None or not lines:
            return False
        # A newline inside a value would smuggle in another KEY=VALUE line.
        message = "\n".join(_one_line(line) for line in lines)
        payload = message.encode("utf-8", errors="replace")
        with self._lock:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(_SEND_TIMEOUT_SECONDS)
                    sock.connect(self._address)
                    sock.sendall(payload)
            except OSError as exc:
                self._log_failure(exc)
                return False
        return True

    def _log_failure(self, exc: OSError) -> None:
        if self._failure_warned:
            log.debug("sd_notify to %r failed again: %s", self._address, exc)
            return
        self._failure_warned = True
        log.warning(
            "cannot notify systemd via NOTIFY_SOCKET=%r: %s (further failures logged at DEBUG)",
            self._address,
            exc,
        )


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]
    log.warning(
        "NOTIFY_SOCKET=%r is neither a path nor an abstract socket; systemd will not be notified",
        value,
    )
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process, as sd_watchdog_enabled(3) checks."""
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a number; watchdog ignored", pid_text)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; watchdog ignored", usec_text)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not positive; watchdog ignored", usec_text)
        return None
    return usec
