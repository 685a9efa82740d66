"""Which trust this kit is: the hub's word, checked against the kit and the state on disk."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from trust_poller.errors import IdentityMismatch
from trust_poller.hub import Identity

log = logging.getLogger(__name__)


def same_trust(left: str, right: str) -> bool:
    """Compare trust ids as UUIDs, case-insensitively (plain text when not UUIDs)."""
    try:
        return uuid.UUID(left) == uuid.UUID(right)
    except ValueError:
        return left.strip().lower() == right.strip().lower()


class IdentityGuard:
    """Checks every identity-bearing hub reply; nothing is claimed until a heartbeat passed.

    A mismatch with EXPECTED_TRUST_ID, with the trust id stored in the state directory, or
    with the identity first seen in this run is fatal: `halt` is set and IdentityMismatch
    raised in whichever thread met it; `fatal` keeps it for the main thread.
    """

    def __init__(
        self,
        expected: uuid.UUID | None,
        halt: threading.Event,
        *,
        stored: str | None = None,
        store: Callable[[str], None] | None = None,
    ) -> None:
        self.expected = expected
        self.stored = stored
        self._store = store
        self._halt = halt
        self.current: Identity | None = None
        self.fatal: IdentityMismatch | None = None
        self.verified = threading.Event()
        self._lock = threading.Lock()

    def _problem(self, identity: Identity) -> str | None:
        if self.expected is not None and not same_trust(identity.trust_id, str(self.expected)):
            return (
                f"the hub says this kit's API key belongs to trust {identity.trust_name!r} "
                f"({identity.trust_id}), but EXPECTED_TRUST_ID is {self.expected}: the wrong "
                "kit is on this host; install this trust's own kit"
            )
        if self.stored is not None and not same_trust(identity.trust_id, self.stored):
            return (
                f"the hub says this kit belongs to trust {identity.trust_id}, but the state "
                f"directory holds work of trust {self.stored}; its unsent results were left "
                "untouched — restore that trust's kit, or move the state directory aside"
            )
        if self.current is not None and not same_trust(identity.trust_id, self.current.trust_id):
            return (
                f"the hub changed this key's trust from {self.current.trust_id} to "
                f"{identity.trust_id} while running; stopping"
            )
        return None

    def check(self, identity: Identity) -> None:
        """Any reply with trust_id and trust_name: raise IdentityMismatch if it is wrong."""
        with self._lock:
            if self.fatal is not None:
                raise self.fatal
            problem = self._problem(identity)
            if problem is not None:
                self.fatal = IdentityMismatch(problem)
                log.critical("IDENTITY MISMATCH: %s", problem)
                self._halt.set()
                raise self.fatal
            if self.current is None:
                self.current = identity
                log.info(
                    "authenticated to hub as trust %s (%s)", identity.trust_name, identity.trust_id
                )

    def confirm(self, identity: Identity) -> None:
        """A 200 heartbeat: the check has passed; claiming and re-sending may begin."""
        self.check(identity)
        if self.verified.is_set():
            return
        if self.stored is None and self._store is not None:
            self._store(identity.trust_id)
            self.stored = identity.trust_id
        self.verified.set()

    def matches_expected(self) -> bool | None:
        if self.expected is None or self.current is None:
            return None
        return same_trust(self.current.trust_id, str(self.expected))
