"""`trust-poller demo`: the real poller against a loopback hub and loopback trust services.

Needs no kit and no network: everything listens on 127.0.0.1 and lives in a temporary
directory that is removed afterwards.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trust_poller import crypto
from trust_poller.health import HealthCollector
from trust_poller.kit import load_kit
from trust_poller.ledger import Ledger
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices
from trust_poller.poller import Daemon
from trust_poller.redact import Redactor

DEMO_TIMEOUT_SECONDS = 60.0


def demo_payloads(hub: LoopbackHub) -> list[tuple[str, dict[str, Any]]]:
    """One realistic payload of each task type, as the hub would seal them."""
    project_id = str(uuid.uuid4())
    imaging_project_id = str(uuid.uuid4())
    sealed_project = crypto.seal_envelope(hub.aes_key, project_id.encode(), "project_id")
    query = "SELECT person_id FROM person WHERE year_of_birth < 1960"
    return [
        (
            "cohort_query",
            {
                "encrypted_project_id": sealed_project,
                "query_id": str(uuid.uuid4()),
                "query_name": "Born before 1960",
                "query": query,
                "trust_id": hub.trust_id,
            },
        ),
        (
            "persist_cohort",
            {
                "project_id": project_id,
                "trust_id": hub.trust_id,
                "encrypted_project_id": sealed_project,
                "query": query,
                "query_id": None,
            },
        ),
        (
            "create_imaging",
            {
                "project_id": project_id,
                "trust_id": hub.trust_id,
                "project_name": "Demo chest CT",
                "query": query,
                "dicom_to_nifti": True,
                "users": [
                    {"id": str(uuid.uuid4()), "email": "ada@example.org", "is_disabled": False}
                ],
            },
        ),
        ("get_imaging_status", {"imaging_project_id": imaging_project_id, "encoded_query": "cT0x"}),
        ("reimport_studies", {"imaging_project_id": imaging_project_id, "encoded_query": "cT0x"}),
        ("update_user_profile", {"email": "ada@example.org", "enabled": False}),
        ("delete_imaging", {"imaging_project_id": str(uuid.uuid4())}),
    ]


def write_demo_kit(path: Path, hub: LoopbackHub, services: LoopbackServices) -> None:
    values = {
        **hub.kit_values(),
        "TRUST_INTERNAL_SERVICE_KEY": services.internal_key,
        "DATA_ACCESS_API_URL": services.url,
        "IMAGING_API_URL": services.url,
        "XNAT_URL": services.url,
        "OMOP_DB_HOST": "127.0.0.1",
        "OMOP_DB_PORT": str(services.port),
        "POLL_INTERVAL_SECONDS": "0.5",
        "HEALTH_COLLECT_INTERVAL_SECONDS": "2",
    }
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    path.chmod(0o600)


def _result_text(success: bool | None, result: str | None) -> str:
    if success is None:
        return "-"
    if result is None:
        return "null"
    try:
        document = json.loads(result)
    except ValueError:
        return result[:50]
    if not success and isinstance(document, dict):
        return f"error: {str(document.get('error'))[:44]}"
    return json.dumps(document)[:50]


def run_demo(echo: Callable[[str], None]) -> bool:
    """Run the playground and print what happened; True when every task ended as expected."""
    internal_key = f"demo-internal-{uuid.uuid4().hex}"
    with (
        tempfile.TemporaryDirectory(prefix="trust-poller-demo-") as folder,
        LoopbackHub(trust_name="Demo Hospital NHS Trust") as hub,
    ):
        admin_key = crypto.cohort_admin_key(hub.aes_key_base64)
        with LoopbackServices(internal_key=internal_key, admin_key=admin_key) as services:
            kit_path = Path(folder) / "kit.env"
            write_demo_kit(kit_path, hub, services)
            ids = [hub.enqueue(task_type, payload) for task_type, payload in demo_payloads(hub)]
            tampered = hub.enqueue_envelope(
                "delete_imaging",
                crypto.seal_envelope(hub.aes_key, b"{}", crypto.task_context("cohort_query")),
            )
            ids.append(tampered)
            echo(f"loopback hub {hub.url} — trust {hub.trust_name} ({hub.trust_id})")
            echo(
                f"loopback trust services {services.url}; {len(ids)} tasks enqueued "
                "(one of each type, plus one sealed for another type)\n"
            )
            kit = load_kit(kit_path)
            started = time.monotonic()
            with Ledger.open(Path(folder) / "state") as ledger:
                health = HealthCollector(kit)
                daemon = Daemon(kit, ledger, Redactor(kit.secrets()), health=health)
                runner = threading.Thread(target=daemon.run, name="demo-daemon")
                runner.start()
                done = hub.wait_for(
                    lambda: all(hub.task(i).status in ("COMPLETED", "FAILED") for i in ids),
                    DEMO_TIMEOUT_SECONDS,
                )
                daemon.request_stop()
                runner.join()
                health.close()
            elapsed = time.monotonic() - started
            echo(f"{'task':<10} {'type':<20} {'hub status':<11} {'secs':>5}  result")
            for task_id in ids:
                task = hub.task(task_id)
                seconds = (
                    f"{task.finished_at - task.enqueued_at:5.2f}" if task.finished_at else "    -"
                )
                echo(
                    f"{task_id[:8]:<10} {task.task_type:<20} {task.status:<11} {seconds}  "
                    f"{_result_text(task.success, task.result)}"
                )
            calls = ", ".join(
                f"{c.method} {c.path}"
                for c in services.calls
                if not c.path.startswith(("/health", "/xapi", "/imaging/ping"))
            )
            echo(f"\ntrust-service calls: {calls}")
            echo(
                f"cohort results posted to the hub: {len(hub.cohort_posts)}; heartbeats: "
                f"{len(hub.heartbeats)} (with a health snapshot: "
                f"{sum(h.snapshot is not None for h in hub.heartbeats)})"
            )
            echo(f"finished in {elapsed:.1f} s; every result delivered: {'yes' if done else 'NO'}")
            expected_failure = hub.task(tampered).status == "FAILED"
            others_ok = all(hub.task(i).status == "COMPLETED" for i in ids if i != tampered)
            return done and expected_failure and others_ok
