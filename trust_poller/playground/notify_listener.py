"""A fake systemd notify socket: collects what a daemon tells systemd, for tests.

It binds an abstract AF_UNIX datagram socket (`@trust-poller-test-<uuid>`: no path, so no
108-byte sun_path limit and nothing to clean up) and records every datagram on a thread.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Self


@dataclass(frozen=True)
class Notice:
    """One datagram: when it arrived (monotonic) and its KEY=VALUE lines."""

    at: float
    lines: tuple[str, ...]


class NotifyListener:
    def __init__(self) -> None:
        self.name = f"trust-poller-test-{uuid.uuid4()}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind("\0" + self.name)
        self._socket.settimeout(0.05)
        self._notices: list[Notice] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, name="notify-listener", daemon=True)

    @property
    def address(self) -> str:
        """What NOTIFY_SOCKET must hold for a daemon to reach this listener."""
        return "@" + self.name

    @property
    def notices(self) -> list[Notice]:
        with self._lock:
            return list(self._notices)

    @property
    def lines(self) -> list[str]:
        """Every KEY=VALUE line received, in order."""
        return [line for notice in self.notices for line in notice.lines]

    def wait_for(self, predicate_line: str, timeout: float = 20.0) -> bool:
        """Wait until a line starting with `predicate_line` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(predicate_line) for line in self.lines):
                return True
            time.sleep(0.02)
        return False

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            notice = Notice(time.monotonic(), tuple(datagram.decode("utf-8").split("\n")))
            with self._lock:
                self._notices.append(notice)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
