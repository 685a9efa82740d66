"""The identity guard: the hub's word about which trust this kit is, checked before any claim."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid

import pytest

from trust_poller.errors import EXIT_CONFIG, IdentityMismatch
from trust_poller.hub import Identity
from trust_poller.identity import IdentityGuard, same_trust

TRUST_ID = "6f1c2b4e-8a9d-4c3b-9e7f-0a1b2c3d4e5f"
OTHER_ID = "0a0b0c0d-1111-4222-8333-444455556666"
THIS_TRUST = Identity(TRUST_ID, "Trust_1")
OTHER_TRUST = Identity(OTHER_ID, "Trust_2")


class Store:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def __call__(self, trust_id: str) -> None:
        self.saved.append(trust_id)


def _authenticated(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "authenticated to hub" in r.getMessage()]


def test_first_identity_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trust_poller.identity")
    guard = IdentityGuard(None, threading.Event())
    guard.check(THIS_TRUST)
    guard.check(THIS_TRUST)
    guard.confirm(THIS_TRUST)
    assert _authenticated(caplog) == [f"authenticated to hub as trust Trust_1 ({TRUST_ID})"]
    assert guard.current == THIS_TRUST


def test_expected_trust_id_matches_case_insensitively() -> None:
    halt = threading.Event()
    guard = IdentityGuard(uuid.UUID(TRUST_ID), halt)
    guard.confirm(Identity(TRUST_ID.upper(), "Trust_1"))
    assert guard.verified.is_set()
    assert not halt.is_set()
    assert guard.fatal is None


def test_expected_trust_id_mismatch_is_fatal_and_stops_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    halt = threading.Event()
    guard = IdentityGuard(uuid.UUID(TRUST_ID), halt)
    with pytest.raises(IdentityMismatch) as caught:
        guard.check(OTHER_TRUST)
    message = str(caught.value)
    assert "EXPECTED_TRUST_ID" in message
    assert OTHER_ID in message
    assert TRUST_ID in message
    assert halt.is_set()
    assert guard.fatal is caught.value
    assert caught.value.exit_code == EXIT_CONFIG
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    assert _authenticated(caplog) == []


def test_after_a_mismatch_every_later_check_raises_even_for_the_right_trust() -> None:
    guard = IdentityGuard(uuid.UUID(TRUST_ID), threading.Event())
    with pytest.raises(IdentityMismatch) as first:
        guard.check(OTHER_TRUST)
    with pytest.raises(IdentityMismatch) as second:
        guard.check(THIS_TRUST)
    with pytest.raises(IdentityMismatch):
        guard.confirm(THIS_TRUST)
    assert second.value is first.value
    assert not guard.verified.is_set()
    assert guard.current is None


def test_stored_trust_id_mismatch_names_the_state_directory() -> None:
    halt = threading.Event()
    store = Store()
    guard = IdentityGuard(None, halt, stored=OTHER_ID, store=store)
    with pytest.raises(IdentityMismatch, match="state directory") as caught:
        guard.confirm(THIS_TRUST)
    assert OTHER_ID in str(caught.value)
    assert halt.is_set()
    assert not guard.verified.is_set()
    assert store.saved == []


def test_stored_trust_id_matches_case_insensitively_and_is_not_rewritten() -> None:
    store = Store()
    guard = IdentityGuard(None, threading.Event(), stored=TRUST_ID.upper(), store=store)
    guard.confirm(THIS_TRUST)
    assert guard.verified.is_set()
    assert store.saved == []


def test_confirm_sets_verified_and_stores_the_trust_id_once() -> None:
    store = Store()
    guard = IdentityGuard(uuid.UUID(TRUST_ID), threading.Event(), store=store)
    guard.check(THIS_TRUST)
    assert not guard.verified.is_set(), "a poll or result reply alone does not verify"
    guard.confirm(THIS_TRUST)
    guard.confirm(THIS_TRUST)
    assert guard.verified.is_set()
    assert store.saved == [TRUST_ID]
    assert guard.stored == TRUST_ID


def test_identity_change_mid_run_is_a_mismatch() -> None:
    halt = threading.Event()
    guard = IdentityGuard(None, halt)
    guard.confirm(THIS_TRUST)
    with pytest.raises(IdentityMismatch, match="while running"):
        guard.check(OTHER_TRUST)
    assert halt.is_set()
    assert guard.fatal is not None


def test_same_trust_id_under_a_new_name_is_not_a_mismatch() -> None:
    halt = threading.Event()
    guard = IdentityGuard(None, halt)
    guard.check(THIS_TRUST)
    guard.check(Identity(TRUST_ID.upper(), "Trust_1 renamed"))
    assert not halt.is_set()


def test_mismatch_in_another_thread_is_kept_for_the_main_thread() -> None:
    guard = IdentityGuard(uuid.UUID(TRUST_ID), threading.Event())

    def worker_reply() -> None:
        with contextlib.suppress(IdentityMismatch):
            guard.check(OTHER_TRUST)

    thread = threading.Thread(target=worker_reply)
    thread.start()
    thread.join(timeout=2)
    assert isinstance(guard.fatal, IdentityMismatch)


def test_matches_expected() -> None:
    assert IdentityGuard(None, threading.Event()).matches_expected() is None
    unchecked = IdentityGuard(None, threading.Event())
    unchecked.check(THIS_TRUST)
    assert unchecked.matches_expected() is None
    guard = IdentityGuard(uuid.UUID(TRUST_ID), threading.Event())
    assert guard.matches_expected() is None, "unknown until the hub has answered"
    guard.check(Identity(TRUST_ID.upper(), "Trust_1"))
    assert guard.matches_expected() is True


@pytest.mark.parametrize(
    ("left", "right", "same"),
    [
        (TRUST_ID, TRUST_ID.upper(), True),
        (TRUST_ID, TRUST_ID.replace("-", ""), True),
        (TRUST_ID, OTHER_ID, False),
        ("trust-one", " TRUST-ONE ", True),
        ("trust-one", "trust-two", False),
    ],
)
def test_same_trust_compares_as_uuids_case_insensitively(left: str, right: str, same: bool) -> None:
    assert same_trust(left, right) is same
