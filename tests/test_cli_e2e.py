"""The real CLI against a real loopback hub and loopback trust services."""

from __future__ import annotations

import json
import re
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from trust_poller import crypto
from trust_poller.playground.demo import demo_payloads
from trust_poller.playground.harness import Daemon, run_cli, wait_until
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices

KitWriter = Callable[..., Path]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_once_runs_every_task_type_and_reports_each_result(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    ids = {hub.enqueue(task_type, payload): task_type for task_type, payload in demo_payloads(hub)}

    done = run_cli("once", "--kit", str(write_kit()), "--state-dir", str(tmp_path / "state"))

    assert done.returncode == 0, done.stderr
    for task_id, task_type in ids.items():
        task = hub.task(task_id)
        assert task.status == "COMPLETED", (task_type, task.result)
        assert task_id in done.stdout
    assert hub.count("GET", "/tasks/pending") == 1
    assert len(hub.cohort_posts) == 1
    cohort = hub.cohort_posts[0]
    assert all(isinstance(r["value"], str) for group in cohort["data"] for r in group["results"])
    assert services.created_projects
    assert set(services.created_projects.values()) == {1}
    assert "authenticated to hub as trust Test Trust" in done.stderr


def test_once_with_wrong_expected_trust_exits_78_before_any_claim(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path
) -> None:
    hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    kit = write_kit(EXPECTED_TRUST_ID=str(uuid.uuid4()))

    done = run_cli("once", "--kit", str(kit), "--state-dir", str(tmp_path / "state"))

    assert done.returncode == 78
    assert "IDENTITY MISMATCH" in done.stderr
    assert hub.count("GET", "/tasks/pending") == 0
    assert all(task.status == "PENDING" for task in hub.tasks())


def test_once_with_revoked_key_exits_77_and_never_prints_the_key(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path
) -> None:
    wrong_key = "revoked-canary-" + uuid.uuid4().hex
    done = run_cli(
        "once",
        "--kit",
        str(write_kit(TRUST_API_KEY=wrong_key)),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert done.returncode == 77
    assert "TRUST_API_KEY" in done.stderr
    assert wrong_key not in done.stderr + done.stdout


def test_once_with_unreachable_hub_exits_69(write_kit: KitWriter, tmp_path: Path) -> None:
    kit = write_kit(CENTRAL_HUB_API_URL=f"http://127.0.0.1:{_closed_port()}/api")
    done = run_cli("once", "--kit", str(kit), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 69
    assert "connection refused" in done.stderr


def test_broken_kit_exits_78_with_one_line_naming_key_file_and_fix(
    write_kit: KitWriter, tmp_path: Path
) -> None:
    kit = write_kit(AES_KEY_BASE64="c2hvcnQ=")
    done = run_cli("once", "--kit", str(kit), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 78
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "AES_KEY_BASE64" in lines[0]
    assert str(kit) in lines[0]
    assert "fix:" in lines[0]
    assert "Traceback" not in done.stderr


def test_missing_kit_exits_78(tmp_path: Path) -> None:
    done = run_cli("whoami", "--kit", str(tmp_path / "nope.env"))
    assert done.returncode == 78
    assert "kit file not found" in done.stderr


def test_kit_path_comes_from_trust_poller_kit_variable(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    done = run_cli("whoami", "--json", TRUST_POLLER_KIT=str(write_kit()))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["trust_id"] == hub.trust_id


def test_whoami_json_reports_identity_keys_and_health(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    done = run_cli("whoami", "--json", "--kit", str(write_kit()))

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["trust_id"] == hub.trust_id
    assert report["trust_name"] == "Test Trust"
    assert report["hub_url"] == hub.url
    assert report["hub_version"] == "loopback-1"
    assert report["key_fingerprint"] == crypto.key_fingerprint(hub.aes_key)
    assert report["hub_key_fingerprint"] == report["key_fingerprint"]
    assert report["key_match"] is True
    assert report["expected_trust_id"] == hub.trust_id
    assert report["identity_match"] is True
    assert report["health"]["services"]["trust-api"]["status"] == "healthy"
    assert hub.heartbeats[-1].snapshot is not None


def test_whoami_with_stale_key_exits_78_and_says_so(write_kit: KitWriter) -> None:
    other_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    done = run_cli("whoami", "--kit", str(write_kit(AES_KEY_BASE64=other_key)))
    assert done.returncode == 78
    assert "72cd6e8422c4" in done.stdout
    assert "MISMATCH" in done.stdout


def test_whoami_without_expected_trust_reports_null_match(write_kit: KitWriter) -> None:
    done = run_cli("whoami", "--json", "--kit", str(write_kit(EXPECTED_TRUST_ID="")))
    report = json.loads(done.stdout)
    assert report["expected_trust_id"] is None
    assert report["identity_match"] is None


def test_tampered_payload_fails_that_task_and_its_handler_never_runs(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    sealed_for_other_type = crypto.seal_envelope(
        hub.aes_key, b'{"imaging_project_id": "x"}', crypto.task_context("get_imaging_status")
    )
    bad = hub.enqueue_envelope("delete_imaging", sealed_for_other_type)
    good = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})

    done = run_cli("once", "--kit", str(write_kit()), "--state-dir", str(tmp_path / "state"))

    assert done.returncode == 0, done.stderr
    assert hub.task(bad).status == "FAILED"
    assert "failed authentication" in json.loads(hub.task(bad).result or "{}")["error"]
    assert hub.task(good).status == "COMPLETED"
    assert [c.method for c in services.calls if c.path.startswith("/projects")] == ["DELETE"]


def test_run_survives_an_outage_and_stops_cleanly_on_sigterm(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(write_kit())
    assert daemon.wait_for_log("authenticated to hub as trust")
    hub.set_outage("reset")
    first = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    assert daemon.wait_for_log("hub unreachable since")
    hub.set_outage(None)
    assert wait_until(lambda: hub.task(first).status == "COMPLETED", 30)
    assert daemon.wait_for_log("hub reachable again after")

    daemon.signal(signal.SIGTERM)

    assert daemon.wait(30) == 0
    assert daemon.process.returncode == 0


def test_idle_cycles_are_silent_at_info(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(write_kit())
    assert daemon.wait_for_log("authenticated to hub as trust")
    lines_after_start = len(daemon.log.splitlines())
    polls = hub.count("GET", "/tasks/pending")
    assert wait_until(lambda: hub.count("GET", "/tasks/pending") >= polls + 10, 20)

    assert len(daemon.log.splitlines()) == lines_after_start, daemon.log
    assert daemon.stop() == 0


def test_python_dash_m_and_version_work() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert re.search(r"trust-poller, version \d", done.stdout)


def test_demo_runs_one_task_of_each_type_against_the_loopback_pair() -> None:
    done = run_cli("demo", timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    for task_type in (
        "cohort_query",
        "persist_cohort",
        "create_imaging",
        "delete_imaging",
        "get_imaging_status",
        "reimport_studies",
        "update_user_profile",
    ):
        assert re.search(rf"{task_type}\s+COMPLETED", done.stdout), task_type
    assert re.search(r"delete_imaging\s+FAILED .*failed authentication", done.stdout)
    assert "every result delivered: yes" in done.stdout
