"""Shared fixtures: loopback hub and trust services, kit files, and the real CLI as a process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trust_poller import crypto
from trust_poller.playground.harness import ENV_DROP, Daemon, cli_env
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices

INTERNAL_KEY = "internal-canary-Zq8xT2vN5mK7pL4w"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine sets CA bundles (and may set proxies); tests must not depend on them."""
    for name in list(os.environ):
        if ENV_DROP.match(name):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    with LoopbackHub(trust_name="Test Trust") as server:
        yield server


@pytest.fixture
def services(hub: LoopbackHub) -> Iterator[LoopbackServices]:
    admin_key = crypto.cohort_admin_key(hub.aes_key_base64)
    with LoopbackServices(internal_key=INTERNAL_KEY, admin_key=admin_key) as server:
        yield server


KitWriter = Callable[..., Path]


@pytest.fixture
def write_kit(tmp_path: Path, hub: LoopbackHub, services: LoopbackServices) -> KitWriter:
    """Write a kit for the loopback hub and services; keyword overrides (None removes a key)."""

    def write(name: str = "kit.env", **overrides: str | None) -> Path:
        values: dict[str, str | None] = {
            **hub.kit_values(),
            "TRUST_INTERNAL_SERVICE_KEY": INTERNAL_KEY,
            "DATA_ACCESS_API_URL": services.url,
            "IMAGING_API_URL": services.url,
            "XNAT_URL": services.url,
            "OMOP_DB_HOST": "127.0.0.1",
            "OMOP_DB_PORT": str(services.port),
            "POLL_INTERVAL_SECONDS": "0.2",
            "HEALTH_COLLECT_INTERVAL_SECONDS": "1",
            **overrides,
        }
        path = tmp_path / name
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items() if v is not None))
        path.chmod(0o600)
        return path

    return write


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(kit: Path, *extra: str, state_dir: Path | None = None, **env: str) -> Daemon:
        state = state_dir or tmp_path / "state"
        log_path = tmp_path / f"daemon-{len(started)}.log"
        daemon = Daemon(
            ["run", "--kit", str(kit), "--state-dir", str(state), *extra], log_path, cli_env(**env)
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)
        daemon._log.close()
