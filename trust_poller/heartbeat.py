"""The heartbeat: its own thread and schedule, whatever the handlers are doing.

The hub shows a trust offline 30 s after its last heartbeat, so nothing here waits on a
task. During an outage heartbeats keep their interval (they are the probe that notices
recovery) and slow down only when the hub says so (429 / Retry-After).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from trust_poller.errors import IdentityMismatch
from trust_poller.health import HealthCollector
from trust_poller.hub import (
    Halted,
    HeartbeatReply,
    HubClient,
    HubError,
    HubKeyRejected,
    SnapshotRejected,
)
from trust_poller.identity import IdentityGuard
from trust_poller.kit import Kit
from trust_poller.ledger import StateUnwritable
from trust_poller.pacing import Backoff, HubBudgets, HubTrouble, ProblemLog

log = logging.getLogger(__name__)

# After the hub rejects a health snapshot, heartbeats go without one for this long.
SNAPSHOT_PAUSE_SECONDS = 600.0


class Heartbeat:
    def __init__(
        self,
        kit: Kit,
        budgets: HubBudgets,
        guard: IdentityGuard,
        trouble: HubTrouble,
        halt: threading.Event,
        health: HealthCollector | None = None,
        *,
        snapshot_pause: float = SNAPSHOT_PAUSE_SECONDS,
    ) -> None:
        self.kit = kit
        self.budgets = budgets
        self.guard = guard
        self.trouble = trouble
        self.state_trouble = ProblemLog("state directory cannot be written")
        self.halt = halt
        self.health = health
        self.last_success: float | None = None
        self.last_reply: HeartbeatReply | None = None
        self.key_match: bool | None = None
        self.snapshot_pause = snapshot_pause
        self._snapshot_paused_until = 0.0

    def _snapshot(self) -> dict[str, Any] | None:
        if self.health is None or time.monotonic() < self._snapshot_paused_until:
            return None
        return self.health.latest()

    def beat(self, client: HubClient) -> HeartbeatReply:
        """One heartbeat (and its bodyless resend after a 422); raises on failure."""
        snapshot = self._snapshot()
        try:
            reply = client.heartbeat(self.budgets.heartbeats, snapshot)
        except SnapshotRejected as rejected:
            log.error(
                "hub rejected the health snapshot (422: %s); heartbeats go without one for "
                "%g minutes",
                rejected,
                self.snapshot_pause / 60,
            )
            self._snapshot_paused_until = time.monotonic() + self.snapshot_pause
            self.budgets.heartbeats.charge()
            reply = client.heartbeat(None, None)
        # Before confirm(): the claim loop starts once the identity is confirmed, and must
        # already know whether the kit's key is stale.
        self._check_key(reply.hub_key_fingerprint)
        self.guard.confirm(reply.identity)
        self.last_success = time.monotonic()
        self.last_reply = reply
        self.trouble.succeeded("heartbeat")
        return reply

    def _check_key(self, hub_fingerprint: str | None) -> None:
        """Stale-kit guard: a different AES key means every task would fail to decrypt."""
        if hub_fingerprint is None:
            self.key_match = None
            return
        matches = hub_fingerprint == self.kit.key_fingerprint
        if not matches and self.key_match is not False:
            log.warning(
                "STALE KIT: the hub's AES key fingerprint is %s but this kit's is %s; every "
                "task would fail to decrypt, so claiming is paused — install the kit's "
                "current hub-shared block (AES_KEY_BASE64) from the hub",
                hub_fingerprint,
                self.kit.key_fingerprint,
            )
        elif matches and self.key_match is False:
            log.warning("the kit's AES key matches the hub's again; claiming resumes")
        self.key_match = matches

    @property
    def claiming_allowed(self) -> bool:
        return self.key_match is not False

    @property
    def period(self) -> float:
        """The heartbeat interval, stretched to what the hub's heartbeat budget sustains.

        A budget spent in a burst would silence heartbeats for the rest of its minute, and
        the hub shows a trust offline after 30 s; evenly spaced beats never run it dry.
        """
        return max(self.kit.heartbeat_interval, self.budgets.heartbeats.spacing)

    def run(self) -> None:
        """Thread body: beat every period on the monotonic clock until halted.

        Outages and 5xx keep the schedule (the next beat is the probe that notices recovery);
        a 429 delays it through the budget's Retry-After; a rejected key backs off.
        """
        client = HubClient(self.kit, self.halt, on_identity=self.guard.check)
        period = self.period
        if period > self.kit.heartbeat_interval:
            log.info(
                "heartbeats every %.1f s, not every %g s: HUB_HEARTBEATS_PER_MINUTE=%g allows "
                "no more",
                period,
                self.kit.heartbeat_interval,
                self.kit.hub_heartbeats_per_minute,
            )
        rejected = Backoff(period)
        next_beat = time.monotonic()
        try:
            while not self.halt.is_set():
                started = time.monotonic()
                delay = period
                try:
                    self.beat(client)
                    rejected.reset()
                    self.state_trouble.recovered("state directory writable again")
                except (Halted, IdentityMismatch):
                    return
                except (HubError, HubKeyRejected) as exc:
                    self.trouble.failed_call(exc, channel="heartbeat")
                    if isinstance(exc, HubKeyRejected):
                        delay = rejected.next_delay()
                except StateUnwritable as exc:
                    # The trust id could not be stored: not verified yet, so nothing is claimed.
                    self.state_trouble.failed(f"{exc}; cannot record the trust id", logging.ERROR)
                next_beat = max(next_beat + delay, started)
                self.halt.wait(max(0.0, next_beat - time.monotonic()))
        finally:
            client.close()
