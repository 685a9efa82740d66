"""The Daemon's own safety nets: a crashed thread stops it, a full disk never stops heartbeats."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trust_poller.errors import EXIT_INTERNAL_ERROR, DaemonCrashed
from trust_poller.kit import Kit, load_kit
from trust_poller.ledger import Ledger, StateUnwritable
from trust_poller.playground.harness import wait_until
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.poller import Daemon
from trust_poller.redact import Redactor

KitWriter = Callable[..., Path]


@pytest.fixture
def kit(write_kit: KitWriter) -> Kit:
    return load_kit(write_kit(POLL_INTERVAL_SECONDS="0.1", HUB_HEARTBEATS_PER_MINUTE="6000"))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def test_a_crashed_thread_stops_the_daemon_with_an_internal_error(
    kit: Kit, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = Daemon(kit, ledger, Redactor(kit.secrets()))

    def broken_reporter() -> None:
        raise RuntimeError("a bug in the reporter")

    monkeypatch.setattr(daemon.reporter, "run", broken_reporter)
    finished = threading.Event()
    raised: list[DaemonCrashed] = []

    def run() -> None:
        try:
            daemon.run()
        except DaemonCrashed as exc:
            raised.append(exc)
        finished.set()

    threading.Thread(target=run, daemon=True).start()

    assert finished.wait(15)
    assert len(raised) == 1
    assert isinstance(raised[0], DaemonCrashed)
    assert raised[0].exit_code == EXIT_INTERNAL_ERROR
    assert "reporter" in str(raised[0])


def test_heartbeats_go_on_when_the_trust_id_cannot_be_stored(
    kit: Kit, ledger: Ledger, hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_full = threading.Event()
    disk_full.set()
    real_store = ledger.store_trust_id

    def store(trust_id: str) -> None:
        if disk_full.is_set():
            raise StateUnwritable("database or disk is full")
        real_store(trust_id)

    monkeypatch.setattr(ledger, "store_trust_id", store)
    daemon = Daemon(kit, ledger, Redactor(kit.secrets()))
    daemon.guard._store = store
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: len(hub.heartbeats) >= 5, 10), "heartbeats stopped"
        assert not daemon.guard.verified.is_set()
        assert hub.count("GET", "/tasks/pending") == 0

        disk_full.clear()

        assert wait_until(daemon.guard.verified.is_set, 10)
        assert ledger.stored_trust_id() == hub.trust_id
        assert wait_until(lambda: hub.count("GET", "/tasks/pending") > 0, 10)
    finally:
        daemon.request_stop()
        runner.join(20)
