"""`trust-poller whoami`: one heartbeat, and who the hub says this kit is."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from trust_poller.errors import (
    EXIT_CONFIG,
    EXIT_OK,
)
from trust_poller.health import HealthCollector
from trust_poller.hub import HubClient, SnapshotRejected
from trust_poller.identity import same_trust
from trust_poller.kit import Kit


@dataclass(frozen=True)
class IdentityReport:
    trust_id: str
    trust_name: str
    hub_url: str
    hub_version: str | None
    key_fingerprint: str
    hub_key_fingerprint: str | None
    expected_trust_id: str | None
    health: dict[str, Any] | None

    @property
    def key_match(self) -> bool | None:
        if self.hub_key_fingerprint is None:
            return None
        return self.hub_key_fingerprint == self.key_fingerprint

    @property
    def identity_match(self) -> bool | None:
        if self.expected_trust_id is None:
            return None
        return same_trust(self.trust_id, self.expected_trust_id)

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if False in (self.key_match, self.identity_match) else EXIT_OK

    def as_json(self) -> dict[str, Any]:
        return {
            "trust_id": self.trust_id,
            "trust_name": self.trust_name,
            "hub_url": self.hub_url,
            "hub_version": self.hub_version,
            "key_fingerprint": self.key_fingerprint,
            "hub_key_fingerprint": self.hub_key_fingerprint,
            "key_match": self.key_match,
            "expected_trust_id": self.expected_trust_id,
            "identity_match": self.identity_match,
            "health": self.health,
        }


def identify(kit: Kit) -> IdentityReport:
    """One probe round, then one heartbeat carrying it. Raises HubError / HubKeyRejected."""
    health = HealthCollector(kit)
    try:
        snapshot = health.collect_round()
    finally:
        health.close()
    client = HubClient(kit, threading.Event())
    try:
        try:
            reply = client.heartbeat(None, snapshot)
        except SnapshotRejected:
            reply = client.heartbeat(None, None)
    finally:
        client.close()
    return IdentityReport(
        trust_id=reply.identity.trust_id,
        trust_name=reply.identity.trust_name,
        hub_url=kit.hub_url,
        hub_version=reply.hub_version,
        key_fingerprint=kit.key_fingerprint,
        hub_key_fingerprint=reply.hub_key_fingerprint,
        expected_trust_id=str(kit.expected_trust_id) if kit.expected_trust_id else None,
        health=snapshot,
    )


def _verdict(match: bool | None, unknown: str) -> str:
    if match is None:
        return unknown
    return "match" if match else "MISMATCH"


def render_identity(report: IdentityReport) -> str:
    expected = report.expected_trust_id or "(EXPECTED_TRUST_ID not set)"
    lines = [
        f"trust:           {report.trust_name} ({report.trust_id})",
        f"hub:             {report.hub_url} (version {report.hub_version or 'not reported'})",
        f"expected trust:  {expected} — {_verdict(report.identity_match, 'not checked')}",
        f"AES key:         this kit {report.key_fingerprint}, hub "
        f"{report.hub_key_fingerprint or 'not reported'} — "
        f"{_verdict(report.key_match, 'unknown (older hub)')}",
    ]
    if report.health is not None:
        services = report.health.get("services", {})
        states = ", ".join(f"{name} {probe.get('status')}" for name, probe in services.items())
        lines.append(f"health:          {states}")
    else:
        lines.append("health:          probe round failed (heartbeats would carry no snapshot)")
    if report.identity_match is False:
        lines.append("PROBLEM: the hub says this kit belongs to another trust — wrong kit on host")
    if report.key_match is False:
        lines.append("PROBLEM: the kit's AES key is stale — every task would fail to decrypt")
    return "\n".join(lines)
