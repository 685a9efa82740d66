"""sd_notify: exact datagrams on real AF_UNIX sockets, and silence outside systemd."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from trust_poller.notify import SystemdNotifier


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound abstract socket and its NOTIFY_SOCKET spelling (@name)."""
    name = f"trust-poller-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        yield f"@{name}", sock


@pytest.fixture
def path_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound socket in a short temp dir (sun_path is limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tp-", dir="/tmp") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2.0)
            yield path, sock


def _receive(sock: socket.socket) -> bytes:
    return sock.recv(65536)


def _assert_nothing_waiting(sock: socket.socket) -> None:
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(65536)


def test_every_message_arrives_exactly_on_an_abstract_socket(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready()
    assert _receive(sock) == b"READY=1"
    assert notifier.status("polling hub.example.org")
    assert _receive(sock) == b"STATUS=polling hub.example.org"
    assert notifier.watchdog()
    assert _receive(sock) == b"WATCHDOG=1"
    assert notifier.extend_timeout(30)
    assert _receive(sock) == b"EXTEND_TIMEOUT_USEC=30000000"
    assert notifier.extend_timeout(1.5)
    assert _receive(sock) == b"EXTEND_TIMEOUT_USEC=1500000"
    assert notifier.stopping()
    assert _receive(sock) == b"STOPPING=1"
    _assert_nothing_waiting(sock)


def test_every_message_arrives_exactly_on_a_path_socket(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})

    assert notifier.ready()
    assert _receive(sock) == b"READY=1"
    assert notifier.status("draining")
    assert _receive(sock) == b"STATUS=draining"
    assert notifier.watchdog()
    assert _receive(sock) == b"WATCHDOG=1"
    assert notifier.extend_timeout(0.25)
    assert _receive(sock) == b"EXTEND_TIMEOUT_USEC=250000"
    assert notifier.stopping()
    assert _receive(sock) == b"STOPPING=1"


def test_status_is_one_utf8_line(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})

    assert notifier.status("hub down\nretrying\r\nin 5 s — ok")
    assert _receive(sock) == "STATUS=hub down retrying in 5 s — ok".encode()


def test_send_joins_lines_into_one_datagram(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})

    assert notifier.send("READY=1", "STATUS=up\nWATCHDOG=trigger")
    # The newline inside a value cannot smuggle in a third line.
    assert _receive(sock) == b"READY=1\nSTATUS=up WATCHDOG=trigger"


def test_concurrent_sends_each_arrive_whole(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    threads = [threading.Thread(target=notifier.status, args=(f"worker {n}",)) for n in range(20)]
    for thread in threads:
        thread.start()
    # Read while they send: a datagram queue holds only ~10 messages (net.unix.max_dgram_qlen).
    received = {_receive(sock) for _ in range(20)}
    for thread in threads:
        thread.join()

    assert received == {f"STATUS=worker {n}".encode() for n in range(20)}


def test_without_notify_socket_nothing_is_sent_and_nothing_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trust_poller.notify")
    notifier = SystemdNotifier.from_environ({})

    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.extend_timeout(10)
    assert caplog.records == []


def test_from_environ_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, abstract_socket: tuple[str, socket.socket]
) -> None:
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)

    assert SystemdNotifier.from_environ().ready()
    assert _receive(sock) == b"READY=1"

    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not SystemdNotifier.from_environ().enabled


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify", "x"])
def test_unsupported_socket_form_warns_once_and_stays_disabled(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trust_poller.notify")
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": value})

    assert not notifier.enabled
    assert not notifier.ready()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert value in warnings[0].getMessage()


def test_send_failure_is_logged_once_as_warning_then_debug_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trust_poller.notify")
    notifier = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": f"@trust-poller-test-nobody-{uuid.uuid4()}"}
    )

    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.watchdog()
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_watchdog_interval_is_half_of_watchdog_usec_when_pid_is_unset() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "90000000"})
    assert notifier.watchdog_interval() == 45.0


def test_watchdog_interval_when_watchdog_pid_is_this_process() -> None:
    notifier = SystemdNotifier.from_environ(
        {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval() == 1.5


def test_watchdog_interval_is_none_when_meant_for_another_process() -> None:
    notifier = SystemdNotifier.from_environ(
        {"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert notifier.watchdog_interval() is None


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_PID": "1"},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": "me"},
    ],
)
def test_watchdog_interval_is_none_without_a_usable_watchdog(environ: dict[str, str]) -> None:
    assert SystemdNotifier.from_environ(environ).watchdog_interval() is None
