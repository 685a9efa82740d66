"""Operations, end to end: the real CLI as systemd, journald and an operator see it.

sd_notify through a fake NOTIFY_SOCKET, logs under journald and as JSON, no secret in any
output at DEBUG, the health snapshot on heartbeats, the stale-kit guard, kit hygiene and
exit codes — each against the loopback hub and loopback trust services.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from click.testing import CliRunner

from trust_poller import __version__, cli, crypto, errors
from trust_poller.health import HealthCollector
from trust_poller.heartbeat import Heartbeat
from trust_poller.hub import HubClient
from trust_poller.identity import IdentityGuard
from trust_poller.kit import DEFAULT_KIT_PATH, load_kit
from trust_poller.notify import SystemdNotifier
from trust_poller.pacing import HubBudgets, HubTrouble
from trust_poller.playground.demo import demo_payloads
from trust_poller.playground.harness import Daemon, cli_env, run_cli, wait_until
from trust_poller.playground.http_server import RawReply, RecordedRequest, Reply, json_reply
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices
from trust_poller.playground.notify_listener import NotifyListener
from trust_poller.redact import MASK

KitWriter = Callable[..., Path]
DaemonStarter = Callable[..., Daemon]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
SERVICES = {"trust-api", "imaging-api", "data-access-api", "xnat", "dicom", "omop"}
FAST = {"HUB_HEARTBEATS_PER_MINUTE": "600", "HUB_POLLS_PER_MINUTE": "600"}


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    with NotifyListener() as listener:
        yield listener


def delete_task(hub: LoopbackHub) -> str:
    return hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})


def status_lines(listener: NotifyListener) -> list[str]:
    return [line.removeprefix("STATUS=") for line in listener.lines if line.startswith("STATUS=")]


def first_index(lines: list[str], predicate: Callable[[str], bool]) -> int:
    return next(index for index, line in enumerate(lines) if predicate(line))


# --- 1. systemd readiness, watchdog, status, stop --------------------------------------------

STATUS_FIELDS = re.compile(
    r"hub (ok|not reached yet|unreachable|key rejected|rate-limited); "
    r"last heartbeat (\d+s ago|none yet); \d+ running, \d+ queued; \d+ results waiting$"
)


def test_systemd_hears_ready_watchdog_status_extend_timeout_and_stopping_in_order(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    start_daemon: DaemonStarter,
    notify: NotifyListener,
) -> None:
    hub.set_outage("hang")  # the hub accepts connections and never answers
    daemon = start_daemon(
        write_kit(**FAST), NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="2000000"
    )  # WATCHDOG_PID unset, as when systemd's main process is the daemon itself

    assert notify.wait_for("READY=1", 20), daemon.log
    assert hub.heartbeats == []  # boot never waits for the hub
    assert notify.wait_for("WATCHDOG=1", 5)
    assert wait_until(lambda: "last heartbeat none yet" in " ".join(status_lines(notify)), 5)

    hub.set_outage(None)
    services.set_delay("/projects/", 3.0)
    task = delete_task(hub)
    running = re.compile(r"hub ok; last heartbeat \d+s ago; 1 running, 0 queued; 0 results")
    assert wait_until(lambda: any(running.match(s) for s in status_lines(notify)), 20), (
        status_lines(notify)[-3:]
    )
    sigterm_at = time.monotonic()
    daemon.signal(signal.SIGTERM)

    assert daemon.wait(30) == 0, daemon.log
    assert hub.task(task).status == "COMPLETED"
    lines = notify.lines
    assert lines[0] == "READY=1"
    assert lines[-1] == "STOPPING=1"
    assert lines.count("STOPPING=1") == 1
    extend = first_index(lines, lambda line: line.startswith("EXTEND_TIMEOUT_USEC="))
    assert int(lines[extend].split("=", 1)[1]) > 30_000_000  # covers the 30 s default drain
    assert first_index(lines, lambda line: line == "WATCHDOG=1") < extend
    last_running = max(i for i, line in enumerate(lines) if running.match(line[7:]))
    draining = first_index(lines, lambda line: line.startswith("STATUS=draining; "))
    assert last_running < min(draining, extend)
    assert "WATCHDOG=1" in lines[extend:]  # the loop keeps turning while it drains
    for status in status_lines(notify):
        assert STATUS_FIELDS.search(status), status
    # Pinged at least every half WATCHDOG_USEC (1 s) while the loop turned, hub down or not.
    pings = [n.at for n in notify.notices if "WATCHDOG=1" in n.lines and n.at < sigterm_at]
    assert len(pings) >= 3
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.5


def test_without_watchdog_usec_no_watchdog_ping_is_sent(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: DaemonStarter, notify: NotifyListener
) -> None:
    daemon = start_daemon(write_kit(), NOTIFY_SOCKET=notify.address)
    assert notify.wait_for("READY=1", 20), daemon.log
    assert wait_until(lambda: hub.count("GET", "/tasks/pending") >= 5, 10)
    assert daemon.stop() == 0

    assert status_lines(notify)
    assert "WATCHDOG=1" not in notify.lines
    assert notify.lines[-1] == "STOPPING=1"


def test_watchdog_meant_for_another_pid_is_not_pinged(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: DaemonStarter, notify: NotifyListener
) -> None:
    daemon = start_daemon(
        write_kit(), NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="2000000", WATCHDOG_PID="1"
    )
    assert notify.wait_for("READY=1", 20), daemon.log
    assert wait_until(lambda: hub.count("GET", "/tasks/pending") >= 5, 10)
    assert daemon.stop() == 0

    assert status_lines(notify)
    assert "WATCHDOG=1" not in notify.lines


def test_each_loop_turn_pings_the_watchdog_but_repeats_no_unchanged_status(
    notify: NotifyListener,
) -> None:
    with_watchdog = SystemdNotifier(notify.address.replace("@", "\0", 1), 2_000_000)
    without = SystemdNotifier(notify.address.replace("@", "\0", 1))

    assert with_watchdog.alive("hub ok")
    assert with_watchdog.alive("hub ok")
    assert with_watchdog.alive("hub unreachable")
    assert without.alive("hub ok")  # new to this notifier: sent
    assert not without.alive("hub ok")

    assert wait_until(lambda: len(notify.notices) == 4, 5)
    assert [notice.lines for notice in notify.notices] == [
        ("WATCHDOG=1", "STATUS=hub ok"),
        ("WATCHDOG=1",),
        ("WATCHDOG=1", "STATUS=hub unreachable"),
        ("STATUS=hub ok",),
    ]


# --- 3. logs: journald, JSON, and no secret anywhere -------------------------------------------


def _once_with_stderr_file(
    kit: Path, state: Path, log_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`once` with stderr on a file, and JOURNAL_STREAM naming that very file (as systemd does)."""
    with log_path.open("w") as stderr:
        status = os.fstat(stderr.fileno())
        state_args = ["--state-dir", str(state)]
        return subprocess.run(
            [sys.executable, "-m", "trust_poller", "once", "--kit", str(kit), *state_args, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=60,
            env=cli_env(JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}"),
            check=False,
        )


def test_under_journald_every_line_has_a_priority_prefix_and_no_timestamp(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path
) -> None:
    delete_task(hub)
    log_path = tmp_path / "journal.log"

    done = _once_with_stderr_file(write_kit(), tmp_path / "state", log_path, "-v")

    assert done.returncode == 0
    lines = log_path.read_text().splitlines()
    assert len(lines) >= 3
    for line in lines:
        assert re.match(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line), line
        assert not TIMESTAMP.search(line), line
    assert any(line.startswith("<7>DEBUG ") for line in lines)
    assert any(line.startswith("<6>INFO ") for line in lines)


def test_under_journald_errors_get_priority_3_for_journalctl_p_err(
    write_kit: KitWriter, tmp_path: Path
) -> None:
    log_path = tmp_path / "journal.log"
    kit = write_kit(TRUST_API_KEY="revoked-" + uuid.uuid4().hex)

    done = _once_with_stderr_file(kit, tmp_path / "state", log_path)

    assert done.returncode == 77
    errors_logged = [line for line in log_path.read_text().splitlines() if "ERROR" in line]
    assert errors_logged
    assert all(line.startswith("<3>ERROR ") for line in errors_logged)


def test_json_log_format_is_one_object_per_line(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path
) -> None:
    delete_task(hub)

    done = run_cli(
        "once", "-v", "--log-format", "json", "--kit", str(write_kit()),
        "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) >= 3
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in entries)
    assert {"DEBUG", "INFO"} <= {entry["level"] for entry in entries}


def test_json_under_journald_keeps_one_object_after_the_prefix(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path
) -> None:
    log_path = tmp_path / "journal.log"

    done = _once_with_stderr_file(
        write_kit(), tmp_path / "state", log_path, "-v", "--log-format", "json"
    )

    assert done.returncode == 0
    lines = log_path.read_text().splitlines()
    assert lines
    for line in lines:
        match = re.match(r"<([2-7])>(\{.*\})$", line)
        assert match, line
        assert isinstance(json.loads(match.group(2)), dict)


def test_a_crashing_thread_is_logged_through_the_redaction_filter(tmp_path: Path) -> None:
    secret = "thread-canary-" + secrets.token_urlsafe(16)
    script = (
        "import threading\n"
        "from trust_poller.logs import setup_logging\n"
        f"setup_logging().add([{secret!r}])\n"
        f"def boom():\n    raise RuntimeError('upstream said ' + {secret!r})\n"
        "thread = threading.Thread(target=boom, name='worker-x')\n"
        "thread.start(); thread.join()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "thread worker-x stopped on an unexpected error" in done.stderr
    assert f"RuntimeError: upstream said {MASK}" in done.stderr
    assert secret not in done.stderr


def secret_forms(secret: str) -> set[str]:
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        forms |= {encode(raw).decode(), encode(raw).decode().rstrip("=")}
    return forms


def header_echo(headers: Mapping[str, str]) -> str:
    """What a careless upstream puts in an error body: the request headers, raw and encoded."""
    values = [value for value in headers.values() if len(value) >= 16]
    encoded = [
        form
        for value in values
        for form in (
            base64.b64encode(value.encode()).decode(),
            base64.urlsafe_b64encode(value.encode()).decode(),
            quote(value, safe=""),
            quote_plus(value),
        )
    ]
    return f"you sent {json.dumps(dict(headers))} | " + " ".join(encoded)


class HeaderEchoingHub(LoopbackHub):
    """The loopback hub, except that the next requests to chosen routes get an error reply
    echoing the request headers (as a broken hub or proxy might)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.echoes: dict[str, list[int]] = {}

    def respond(self, request: RecordedRequest) -> Reply:
        with self._lock:
            statuses = next(
                (s for suffix, s in self.echoes.items() if request.route.endswith(suffix)), []
            )
            status = statuses.pop(0) if statuses else None
        if status is None:
            return super().respond(request)
        return json_reply(status, {"detail": header_echo(request.headers)})


class HeaderEchoingServices(LoopbackServices):
    """Trust services whose chosen routes fail with bodies echoing the request headers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.echoes: dict[str, list[tuple[int, str]]] = {}

    def respond(self, request: RecordedRequest) -> Reply:
        with self._lock:
            matches = [prefix for prefix in self.echoes if request.route.startswith(prefix)]
            queue = self.echoes[max(matches, key=len)] if matches else []
            echo = queue.pop(0) if queue else None
        if echo is None:
            return super().respond(request)
        status, kind = echo
        text = header_echo(request.headers)
        if kind == "html":
            page = f"<html><body><h1>{status}</h1><pre>{text}</pre></body></html>"
            return Reply(status, {"Content-Type": "text/html"}, page.encode())
        return json_reply(status, {"detail": text})


@dataclass
class CanaryPair:
    """A hub and trust services whose keys are canaries, and a kit for them."""

    hub: HeaderEchoingHub
    services: HeaderEchoingServices
    kit: Path
    state: Path

    @property
    def secrets(self) -> list[str]:
        aes_text = self.hub.aes_key_base64
        return [self.hub.api_key, self.services.internal_key, aes_text]

    @property
    def args(self) -> list[str]:
        return ["--kit", str(self.kit), "--state-dir", str(self.state)]

    def forbidden_fragments(self) -> set[str]:
        """Every 12-character piece of every secret in every form it could leave in."""
        admin_key = crypto.cohort_admin_key(self.hub.aes_key_base64)
        forms = {form for secret in [*self.secrets, admin_key] for form in secret_forms(secret)}
        return {form[i : i + 12] for form in forms for i in range(len(form) - 11)}

    def assert_nothing_leaked(self, outputs: dict[str, str]) -> None:
        requests = self.hub.requests_log
        outputs = outputs | {f"hub request {i}": r.body.decode() for i, r in enumerate(requests)}
        outputs |= {f"hub path {i}": r.path for i, r in enumerate(requests)}
        fragments = self.forbidden_fragments()
        for name, text in outputs.items():
            leaked = sorted(fragment for fragment in fragments if fragment in text)
            assert leaked == [], f"{name} shows part of a secret: {leaked[:3]} in {text[:600]}"


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[CanaryPair]:
    api_key = "Ak+" + secrets.token_urlsafe(24) + "/Q="
    internal_key = "In+" + secrets.token_urlsafe(24) + "/Z="
    aes_key = b"\xfb\xff\xbf" + os.urandom(29)  # its base64 has "+" and "/": URL-encodes apart
    with (
        HeaderEchoingHub(api_key=api_key, aes_key=aes_key, trust_name="Canary") as hub,
        HeaderEchoingServices(
            internal_key=internal_key, admin_key=crypto.cohort_admin_key(hub.aes_key_base64)
        ) as services,
    ):
        kit = tmp_path / "kit.env"
        values = {
            **hub.kit_values(),
            "TRUST_INTERNAL_SERVICE_KEY": internal_key,
            "DATA_ACCESS_API_URL": services.url,
            "IMAGING_API_URL": services.url,
            "XNAT_URL": services.url,
            "OMOP_DB_HOST": "127.0.0.1",
            "OMOP_DB_PORT": str(services.port),
            "POLL_INTERVAL_SECONDS": "0.2",
            "HEALTH_COLLECT_INTERVAL_SECONDS": "1",
            "HUB_RESULTS_PER_MINUTE": "600",
            **FAST,
        }
        kit.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        kit.chmod(0o600)
        yield CanaryPair(hub, services, kit, tmp_path / "state")


def test_debug_run_never_shows_a_secret_in_output_or_in_anything_sent_to_the_hub(
    canary: CanaryPair, tmp_path: Path
) -> None:
    hub, services = canary.hub, canary.services
    api_key, internal_key, aes_text = canary.secrets
    # Error paths at the hub: a 500 and a cohort refusal echoing our headers, and a spell
    # of 401 while the hub expects another key.
    hub.echoes = {"/trust/heartbeat": [500], "/tasks/pending": [500], "/cohort/results": [422, 422]}
    # Error paths at the trust services, JSON and HTML, on every task type and on health.
    delete_id = str(uuid.uuid4())
    services.echoes = {
        "/cohort": [(500, "json")],
        "/cohort/snapshot": [(403, "json")],
        "/projects/create-project-from-central-hub-project": [(400, "html")],
        "/retrieval/import_status_count/": [(502, "html")],
        "/retrieval/reimport_imaging_project_studies/": [(404, "json")],
        "/users": [(422, "json")],
        f"/projects/{delete_id}": [(500, "json")],
        "/health": [(500, "json")] * 3,
        "/imaging/ping_pacs": [(500, "html")] * 3,
    }
    payloads = dict(demo_payloads(hub))
    task_ids = [hub.enqueue(task_type, payload) for task_type, payload in payloads.items()]
    task_ids += [
        hub.enqueue("cohort_query", payloads["cohort_query"] | {"query_id": str(uuid.uuid4())}),
        hub.enqueue("delete_imaging", {"imaging_project_id": delete_id}),
        # Invalid payloads carrying secrets where a validation message might quote them.
        hub.enqueue("update_user_profile", {"email": api_key, "enabled": internal_key}),
        hub.enqueue("get_imaging_status", {"imaging_project_id": aes_text}),
        hub.enqueue(
            "cohort_query",
            {"query_id": str(uuid.uuid4()), "trust_id": hub.trust_id, "query": api_key},
        ),
        hub.enqueue_envelope("delete_imaging", "not an envelope " + internal_key),
        hub.enqueue_envelope(
            "reimport_studies",
            base64.b64encode(json.dumps({"v": 1, "kid": api_key}).encode()).decode(),
        ),
    ]
    hub.api_key = "another-key-" + uuid.uuid4().hex  # the hub expects another key at first

    log_path, out_path = tmp_path / "stderr.log", tmp_path / "stdout.log"
    with log_path.open("w") as stderr, out_path.open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "trust_poller", "run", "-v", *canary.args],
            stdout=stdout,
            stderr=stderr,
            env=cli_env(),
        )
        try:
            assert wait_until(lambda: "rejects this kit" in log_path.read_text(), 20)
            hub.api_key = api_key
            assert wait_until(
                lambda: all(hub.task(t).status in ("COMPLETED", "FAILED") for t in task_ids), 45
            ), [hub.task(task_id).status for task_id in task_ids]
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    once_task = hub.enqueue("cohort_query", payloads["cohort_query"])
    services.echoes["/cohort"] = [(500, "json")]
    once = run_cli("once", "-v", *canary.args)
    assert once.returncode == 0, once.stderr
    assert hub.task(once_task).status == "FAILED"

    run_stderr = log_path.read_text()
    canary.assert_nothing_leaked(
        {
            "run stderr": run_stderr,
            "run stdout": out_path.read_text(),
            "once stderr": once.stderr,
            "once stdout": once.stdout,
        }
    )
    # The echoes really went through the logs, the results and the cohort posts (masked).
    assert MASK in run_stderr
    assert " DEBUG " in run_stderr
    assert "hub rejects this kit's API key" in run_stderr
    results = [r.json() for r in hub.requests_log if r.route.endswith("/result")]
    assert any(MASK in (body.get("result") or "") for body in results)
    cohort_posts = [r.json() for r in hub.requests_log if r.route.endswith("/cohort/results")]
    assert any(MASK in (body.get("error") or "") for body in cohort_posts)


def test_a_result_refusal_echoing_our_headers_sends_no_secret_back_to_the_hub(
    canary: CanaryPair,
) -> None:
    canary.hub.echoes = {"/result": [422]}
    task = delete_task(canary.hub)

    once = run_cli("once", "-v", *canary.args)

    assert once.returncode == 0, once.stderr
    assert canary.hub.task(task).status == "FAILED"  # the short failure was accepted
    canary.assert_nothing_leaked({"once stderr": once.stderr, "once stdout": once.stdout})


def test_a_refusal_detail_cut_inside_a_secret_leaks_no_part_of_it(canary: CanaryPair) -> None:
    api_key = canary.hub.api_key

    def refuse(method: str, path: str, body: bytes) -> RawReply | None:
        if not path.endswith("/result"):
            return None
        detail = "x" * (300 - len(api_key) // 2) + api_key  # the cut falls mid-key
        return 409, {"Content-Type": "application/json"}, json.dumps({"detail": detail}).encode()

    canary.hub.override = refuse
    delete_task(canary.hub)

    once = run_cli("once", "-v", *canary.args)

    canary.hub.override = None
    assert "x" * 100 in once.stderr  # the refusal detail did reach the log
    canary.assert_nothing_leaked({"once stderr": once.stderr, "once stdout": once.stdout})


# --- 4. the health snapshot on heartbeats -------------------------------------------------------


def test_heartbeats_carry_the_collectors_snapshot(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: DaemonStarter
) -> None:
    daemon = start_daemon(write_kit(**FAST))
    assert wait_until(lambda: any(b.snapshot for b in hub.heartbeats), 20), daemon.log
    assert daemon.stop() == 0

    snapshot = next(b.snapshot for b in hub.heartbeats if b.snapshot)
    services = snapshot["services"]
    assert set(services) == SERVICES
    assert services["trust-api"] == {"status": "healthy", "version": __version__, "response_ms": 0}
    assert services["imaging-api"]["status"] == "healthy"
    assert services["imaging-api"]["version"] == "svc-1.2.3"
    assert services["xnat"]["version"] == "1.8.10"
    assert isinstance(snapshot["collected_at"], str)


def _reject_heartbeat_bodies(method: str, path: str, body: bytes) -> RawReply | None:
    if path.endswith("/trust/heartbeat") and body.strip():
        detail = json.dumps({"detail": [{"loc": ["body"], "msg": "rejected by test"}]})
        return 422, {"Content-Type": "application/json"}, detail.encode()
    return None


def test_rejected_snapshot_is_resent_bodyless_at_once_then_withheld(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: DaemonStarter
) -> None:
    hub.override = _reject_heartbeat_bodies
    daemon = start_daemon(write_kit(**FAST))
    assert daemon.wait_for_log("hub rejected the health snapshot"), daemon.log
    assert wait_until(lambda: len(hub.heartbeats) >= 10, 20)
    assert daemon.stop() == 0

    beats = [r for r in hub.requests_log if r.route.endswith("/trust/heartbeat")]
    with_body = [i for i, r in enumerate(beats) if r.body.strip()]
    assert len(with_body) == 1  # the rejected one; none again within the 10-minute pause
    rejected = with_body[0]
    resend = beats[rejected + 1]
    assert resend.body == b""
    assert resend.at - beats[rejected].at < 0.5  # at once, not at the next interval
    assert all(b.snapshot is None for b in hub.heartbeats)
    assert "heartbeats go without one for 10 minutes" in daemon.log


class _FixedHealth(HealthCollector):
    """A collector that always has a fresh snapshot (the hub's verdict is what is tested)."""

    def latest(self) -> dict[str, Any] | None:
        return {
            "services": {"trust-api": {"status": "healthy", "version": "x", "response_ms": 0}},
            "collected_at": None,
        }


def test_snapshot_pause_after_a_rejection_lasts_its_duration_then_bodies_resume(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    kit = load_kit(write_kit())
    halt = threading.Event()
    rejections = [True]

    def reject_once(method: str, path: str, body: bytes) -> RawReply | None:
        if body.strip() and rejections:
            rejections.pop()
            return _reject_heartbeat_bodies(method, path, body)
        return None

    hub.override = reject_once
    heartbeat = Heartbeat(
        kit,
        HubBudgets(600, 600, 600),
        IdentityGuard(None, halt),
        HubTrouble(),
        halt,
        _FixedHealth(kit),
        snapshot_pause=0.5,
    )
    client = HubClient(kit, halt)
    try:
        heartbeat.beat(client)  # rejected, then resent without a body
        heartbeat.beat(client)  # paused: no body
        time.sleep(0.6)
        heartbeat.beat(client)  # pause over: the snapshot again
    finally:
        client.close()

    bodies = [bool(r.body.strip()) for r in hub.requests_log]
    assert bodies == [True, False, False, True]
    assert [b.snapshot is not None for b in hub.heartbeats] == [False, False, True]


class DrippingServer:
    """An HTTP server whose replies, while `hanging`, drip one byte at a time and never end."""

    def __init__(self) -> None:
        self.hanging = threading.Event()
        self._stop = threading.Event()
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(65536)
                if not self.hanging.is_set():
                    body = b'{"version": "drip-1"}'
                    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                    connection.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
                    return
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while self.hanging.is_set() and not self._stop.wait(0.3):
                    connection.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def test_a_hung_probe_round_sends_no_body_rather_than_a_stale_snapshot(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: DaemonStarter
) -> None:
    xnat = DrippingServer()
    try:
        daemon = start_daemon(write_kit(XNAT_URL=xnat.url, **FAST))
        assert wait_until(lambda: any(b.snapshot for b in hub.heartbeats), 20), daemon.log
        xnat.hanging.set()
        assert wait_until(lambda: hub.heartbeats[-1].snapshot is None, 15), daemon.log
        bodyless_from = len(hub.heartbeats)
        time.sleep(2.5)  # more rounds start and hang meanwhile
        assert all(b.snapshot is None for b in hub.heartbeats[bodyless_from - 1 :])
        assert len(hub.heartbeats) > bodyless_from  # heartbeats went on, without a body
        xnat.hanging.clear()
        assert wait_until(lambda: hub.heartbeats[-1].snapshot is not None, 15), daemon.log
        assert daemon.stop() == 0
    finally:
        xnat.close()
    assert "health round exceeded its 5 s deadline" in daemon.log


def test_whoami_shows_the_health_round_it_ran(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter
) -> None:
    services.set_pacs(False)

    done = run_cli("whoami", "--kit", str(write_kit()))

    assert done.returncode == 0, done.stderr
    health = next(line for line in done.stdout.splitlines() if line.startswith("health:"))
    assert "trust-api healthy" in health
    assert "dicom down" in health
    assert hub.heartbeats[-1].snapshot is not None
    assert hub.heartbeats[-1].snapshot["services"]["dicom"]["status"] == "down"


# --- 5. the stale-kit guard -------------------------------------------------------------------


def test_stale_kit_keeps_heartbeating_never_claims_and_resumes_when_keys_match(
    hub: LoopbackHub,
    write_kit: KitWriter,
    start_daemon: DaemonStarter,
    notify: NotifyListener,
) -> None:
    hub.fingerprint_override = "000000000000"
    task = delete_task(hub)
    daemon = start_daemon(write_kit(**FAST), NOTIFY_SOCKET=notify.address)

    assert wait_until(lambda: len(hub.heartbeats) >= 8, 20), daemon.log
    assert hub.count("GET", "/tasks/pending") == 0
    assert hub.task(task).status == "PENDING"
    assert daemon.log.count("STALE KIT") == 1
    assert "install the kit's current hub-shared block" in daemon.log
    assert wait_until(lambda: "STALE KIT" in " ".join(status_lines(notify)), 5)

    hub.fingerprint_override = None
    assert wait_until(lambda: hub.task(task).status == "COMPLETED", 20), daemon.log
    assert "matches the hub's again; claiming resumes" in daemon.log
    assert "STALE KIT" not in status_lines(notify)[-1]

    hub.fingerprint_override = "111111111111"
    assert wait_until(lambda: daemon.log.count("STALE KIT") == 2, 20), daemon.log  # re-armed
    time.sleep(0.5)  # a poll already under way may finish
    polls = hub.count("GET", "/tasks/pending")
    time.sleep(1.5)
    assert hub.count("GET", "/tasks/pending") == polls
    assert daemon.stop() == 0


def test_hub_without_a_fingerprint_means_unknown_and_claims_normally(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: DaemonStarter
) -> None:
    hub.report_fingerprint = False
    task = delete_task(hub)
    daemon = start_daemon(write_kit())

    assert wait_until(lambda: hub.task(task).status == "COMPLETED", 20), daemon.log
    assert daemon.stop() == 0
    assert "STALE KIT" not in daemon.log


def test_whoami_names_a_stale_kit(write_kit: KitWriter, hub: LoopbackHub) -> None:
    hub.fingerprint_override = "000000000000"

    done = run_cli("whoami", "--kit", str(write_kit()))

    assert done.returncode == 78
    assert "the kit's AES key is stale" in done.stdout
    assert "hub 000000000000 — MISMATCH" in done.stdout


# --- 7. kit hygiene -----------------------------------------------------------------------------


def test_kit_readable_by_group_warns_naming_the_file_and_the_chmod(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    kit = write_kit()
    kit.chmod(0o640)

    done = run_cli("whoami", "--kit", str(kit))

    assert done.returncode == 0, done.stderr
    assert f"kit {kit} is readable by group or others; run: chmod 600 {kit}" in done.stderr


@pytest.mark.parametrize("command", ["whoami", "run"])
def test_kit_writable_by_others_is_refused_with_exit_78(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path, command: str
) -> None:
    kit = write_kit()
    kit.chmod(0o602)
    extra = ["--state-dir", str(tmp_path / "state")] if command == "run" else []

    done = run_cli(command, "--kit", str(kit), *extra, timeout=30)

    assert done.returncode == 78
    assert f"{kit}: kit file is writable by others; fix: run: chmod 600 {kit}" in done.stderr
    assert hub.heartbeats == []


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """In-process CLI runs install our handler on the root logger; take it off again."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == "trust-poller"]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_whoami_on_the_credential_copy_checks_the_source_kit(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    copy = write_kit("credentials/kit")
    copy.chmod(0o400)
    source = write_kit("source-kit.env")
    monkeypatch.setattr(cli, "DEFAULT_KIT_PATH", source)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    runner = CliRunner()

    source.chmod(0o644)
    warned = runner.invoke(cli.main, ["whoami", "--kit", str(copy)])
    assert warned.exit_code == 0, warned.stderr
    assert f"kit {source} is readable by group or others; run: chmod 600 {source}" in warned.stderr

    source.chmod(0o602)
    refused = runner.invoke(cli.main, ["whoami", "--kit", str(copy)])
    assert refused.exit_code == 78
    assert f"{source}: kit file is writable by others" in refused.stderr


@pytest.mark.usefixtures("restore_logging")
def test_the_credential_copys_own_mode_is_systemds_and_never_warned_about(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    copy = write_kit("credentials/kit")
    copy.chmod(0o440)  # group-readable, as systemd may grant the service's group
    source = write_kit("source-kit.env")
    monkeypatch.setattr(cli, "DEFAULT_KIT_PATH", source)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    done = CliRunner().invoke(cli.main, ["whoami", "--kit", str(copy)])

    assert done.exit_code == 0, done.stderr
    assert "readable by group or others" not in done.stderr


def test_credential_copy_is_recognised_in_the_systemd_location_without_the_variable() -> None:
    systemd_copy = Path("/run/credentials/trust-poller.service/kit")

    assert cli.credential_source(systemd_copy, {}) == DEFAULT_KIT_PATH
    assert cli.credential_source(Path("/srv/kit.env"), {}) is None
    assert cli.credential_source(Path("/x/creds/kit"), {"CREDENTIALS_DIRECTORY": "/x/creds"}) == (
        DEFAULT_KIT_PATH
    )
    assert cli.credential_source(DEFAULT_KIT_PATH, {}) is None


# --- 8. exit codes ------------------------------------------------------------------------------

DOCUMENTED_EXIT_CODES = {0, 2, 69, 70, 75, 77, 78}


def test_every_error_maps_to_a_documented_exit_code() -> None:
    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert set(codes.values()) == DOCUMENTED_EXIT_CODES

    pending: list[type[errors.TrustPollerError]] = [errors.TrustPollerError]
    while pending:
        error = pending.pop()
        assert error.exit_code in DOCUMENTED_EXIT_CODES, error
        pending += error.__subclasses__()


def test_only_the_cli_chooses_exit_codes_and_always_by_name() -> None:
    package = Path(cli.__file__).parent
    exits = re.compile(r"\bsys\.exit\(|\bos\._exit\(|raise SystemExit\b|\bctx\.exit\(")
    found = {
        f"{path.name}: {line.strip()}"
        for path in package.rglob("*.py")
        if "playground" not in path.parts
        for line in path.read_text(encoding="utf-8").splitlines()
        if exits.search(line) and not line.strip().startswith(("#", '"""'))
    }
    assert found == {"cli.py: sys.exit(code)", "poller.py: os._exit(EXIT_OK)"}


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--no-such-option"],
        ["no-such-command"],
        ["whoami", "--log-format", "xml"],
        ["once", "--kit"],
        [],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run_cli(*args).returncode == 2


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (RuntimeError("a bug"), 70),
        (KeyboardInterrupt(), 75),
        (errors.HubUnavailable("down"), 69),
        (errors.KeyRejected("401"), 77),
        (errors.StateLocked("pid 1"), 75),
        (errors.KitError("K", "/kit", "bad", "fix it"), 78),
    ],
)
def test_what_a_command_raises_becomes_its_documented_exit_code(
    monkeypatch: pytest.MonkeyPatch, raised: BaseException, code: int
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "identify", fail)
    monkeypatch.setattr(cli, "start", lambda *args: (None, None))

    result = CliRunner().invoke(cli.main, ["whoami", "--kit", "/nowhere"])

    assert result.exit_code == code
    assert "Traceback" not in result.stderr or code == 70


def test_help_and_version_exit_0() -> None:
    assert run_cli("--help").returncode == 0
    assert run_cli("run", "--help").returncode == 0
    assert run_cli("--version").returncode == 0
