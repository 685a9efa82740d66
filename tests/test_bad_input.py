"""Hostile and broken input: each bad input of the README's "When things go wrong" catalogue
that no module's own tests already prove gets its answer proven here.

The rule for every row: a clear answer, the daemon keeps running, nothing lost or leaked.
The daemon runs in-process against the loopback hub and loopback trust services, or against
a raw socket server where the fault lives below HTTP (a reply cut off, dripped, oversized).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from trust_poller import crypto
from trust_poller.dispatch import envelope_text
from trust_poller.errors import EXIT_CONFIG, EXIT_HUB_UNAVAILABLE, KitError
from trust_poller.hub import PENDING_REPLY_CAP, HubClient, HubError
from trust_poller.kit import Kit, load_kit
from trust_poller.ledger import Ledger, TaskState
from trust_poller.outcome import MAX_ERROR_CHARS, MAX_RESULT_CHARS, Outcome, prepare_for_hub
from trust_poller.playground.kits import kit_in_memory
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices
from trust_poller.poller import Daemon
from trust_poller.redact import MASK, Redactor
from trust_poller.services import ServiceClient, ServiceError

KitWriter = Callable[..., Path]
KIT_SOURCE = Path(__file__).resolve().parents[1] / "trust_poller" / "kit.py"
STUCK_ON_THE_HUB = "30-minute re-queue"


# --- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def in_process(kit_path: Path, state_dir: Path) -> Iterator[Daemon]:
    """The daemon of `trust-poller once/run`, in this process, on its own ledger."""
    kit = load_kit(kit_path)
    with Ledger.open(state_dir) as ledger:
        yield Daemon(kit, ledger, Redactor(kit.secrets()))


def claim_once(daemon: Daemon, **client_options: float) -> int:
    client = HubClient(daemon.kit, daemon.halt, on_identity=daemon.guard.check, **client_options)
    try:
        return daemon.claim(client)
    finally:
        client.close()


def hand_out(hub: LoopbackHub) -> list[dict[str, Any]]:
    """What the hub does before any reply leaves it: mark its pending tasks IN_PROGRESS."""
    reply = requests.get(
        f"{hub.url}/tasks/pending", headers={hub.api_key_header: hub.api_key}, timeout=5
    )
    tasks: list[dict[str, Any]] = reply.json()["tasks"]
    return tasks


def answer_next_poll(hub: LoopbackHub, status: int, content_type: str, body: bytes) -> None:
    """The next GET /tasks/pending gets this reply; later ones reach the hub as usual."""
    served = threading.Event()

    def override(method: str, path: str, _body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        if method == "GET" and "/tasks/pending" in path and not served.is_set():
            served.set()
            return status, {"Content-Type": content_type}, body
        return None

    hub.override = override


def identity(hub: LoopbackHub) -> dict[str, str]:
    return {"trust_id": hub.trust_id, "trust_name": hub.trust_name}


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def result_posts(hub: LoopbackHub, task_id: str) -> list[Any]:
    return [r.json() for r in hub.requests_log if r.route == f"/api/tasks/{task_id}/result"]


def error_of(hub: LoopbackHub, task_id: str) -> dict[str, Any]:
    result = hub.task(task_id).result
    assert result is not None, f"task {task_id} has no result"
    document: dict[str, Any] = json.loads(result)
    return document


class RawHub:
    """A socket server whose `script` writes the reply bytes itself (faults below HTTP)."""

    def __init__(self, script: Callable[[socket.socket, RawHub], None]) -> None:
        self.script = script
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                data = connection.recv(65536)
                if not data:
                    return
                head += data
            with contextlib.suppress(OSError):
                self.script(connection, self)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_hub() -> Iterator[Callable[[Callable[[socket.socket, RawHub], None]], RawHub]]:
    servers: list[RawHub] = []

    def start(script: Callable[[socket.socket, RawHub], None]) -> RawHub:
        servers.append(RawHub(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def kit_for(url: str) -> Kit:
    return kit_in_memory(
        hub_url=f"{url}/api",
        api_key="hub-canary-" + "k" * 32,
        internal_service_key="internal-canary-" + "i" * 24,
    )


IDENTITY_BYTES = b'{"trust_id": "6f1c2b4e-8a9d-4c3b-9e7f-0a1b2c3d4e5f", "trust_name": "T1", '


# --- hub replies to a poll: received, but unusable ----------------------------------------------

UNUSABLE_POLL_REPLIES: dict[str, tuple[str, Callable[[LoopbackHub], bytes]]] = {
    "not-json": ("text/plain", lambda hub: b"OK"),
    "broken-json": ("application/json", lambda hub: b'{"trust_id": "'),
    "empty-body": ("application/json", lambda hub: b""),
    "html-from-a-proxy": ("text/html", lambda hub: b"<html><body>Please sign in</body></html>"),
    "json-not-an-object": ("application/json", lambda hub: b"[]"),
    "tasks-not-a-list": (
        "application/json",
        lambda hub: json.dumps({**identity(hub), "tasks": {"id": str(uuid.uuid4())}}).encode(),
    ),
    "tasks-missing": ("application/json", lambda hub: json.dumps(identity(hub)).encode()),
    "no-identity": ("application/json", lambda hub: b'{"tasks": []}'),
    "nested-too-deep": (
        "application/json",
        lambda hub: (
            json.dumps({**identity(hub), "tasks": "DEEP"})
            .replace('"DEEP"', "[" * 200 + "]" * 200)
            .encode()
        ),
    ),
    "nested-past-the-stack": ("application/json", lambda hub: b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize(
    ("content_type", "body"), UNUSABLE_POLL_REPLIES.values(), ids=UNUSABLE_POLL_REPLIES.keys()
)
def test_unusable_poll_reply_is_refused_and_its_tasks_are_named_as_stuck_on_the_hub(
    hub: LoopbackHub,
    write_kit: KitWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content_type: str,
    body: Callable[[LoopbackHub], bytes],
) -> None:
    task_id = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    hand_out(hub)  # the hub marks tasks IN_PROGRESS before its reply is mangled on the way
    answer_next_poll(hub, 200, content_type, body(hub))

    with in_process(write_kit(), tmp_path / "state") as daemon, caplog.at_level(logging.INFO):
        with pytest.raises(HubError) as refused:
            claim_once(daemon)
        recorded = daemon.ledger.in_state()

    assert refused.value.exit_code == EXIT_HUB_UNAVAILABLE  # `once` exits 69
    assert recorded == []
    stuck = [m for m in errors_logged(caplog) if "poll refused" in m]
    assert len(stuck) == 1, errors_logged(caplog)
    assert "IN_PROGRESS" in stuck[0]
    assert STUCK_ON_THE_HUB in stuck[0]
    assert hub.task(task_id).status == "IN_PROGRESS"


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (502, "text/html", b"<html><h1>502 Bad Gateway</h1>nginx</html>"),
        (503, "application/json", b'{"detail": "Service unavailable"}'),
        (500, "application/json", b'{"detail": "Internal Server Error"}'),
        (302, "text/html", b""),
    ],
    ids=["proxy-502-page", "hub-503", "hub-500", "redirect"],
)
def test_poll_refused_by_a_proxy_or_the_hub_claims_nothing_and_is_not_called_stuck(
    hub: LoopbackHub,
    write_kit: KitWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: int,
    content_type: str,
    body: bytes,
) -> None:
    task_id = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
    answer_next_poll(hub, status, content_type, body)

    with in_process(write_kit(), tmp_path / "state") as daemon, caplog.at_level(logging.INFO):
        with pytest.raises(HubError) as refused:
            claim_once(daemon)
        assert daemon.ledger.in_state() == []

    assert refused.value.status == status
    assert not any("poll refused" in m for m in errors_logged(caplog))
    if content_type == "text/html":
        assert "not the hub's JSON" in refused.value.reason
    assert hub.task(task_id).status == "PENDING"  # the hub itself never handed it out


def test_daemon_keeps_running_through_unusable_polls_and_runs_the_task_once_they_pass(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    refused = threading.Semaphore(3)

    def broken_polls(
        method: str, path: str, _body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        if method == "GET" and "/tasks/pending" in path and refused.acquire(blocking=False):
            return 200, {"Content-Type": "text/html"}, b"<html>captive portal</html>"
        return None

    hub.override = broken_polls
    task_id = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})

    with in_process(write_kit(), tmp_path / "state") as daemon:
        runner = threading.Thread(target=daemon.run, name="daemon-under-test")
        runner.start()
        try:
            done = hub.wait_for(lambda: hub.task(task_id).status == "COMPLETED", 20)
        finally:
            daemon.request_stop()
            runner.join(30)

    assert done
    assert not runner.is_alive()
    assert hub.count("GET", "/tasks/pending") >= 4
    assert len(result_posts(hub, task_id)) == 1


# --- hub replies below HTTP: cut off, dripped, oversized, odd headers ---------------------------


def stream_past_the_pending_cap(connection: socket.socket, server: RawHub) -> None:
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = IDENTITY_BYTES + b'"tasks": [{"padding": "' + b"x" * (1 << 20)
    for _ in range(256):  # 256 MiB on offer; a client that reads it all would take them all
        connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        server.sent += len(chunk)


def test_poll_reply_over_the_64_mib_cap_is_refused_while_streaming(
    raw_hub: Callable[..., RawHub], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = raw_hub(stream_past_the_pending_cap)
    kit = kit_for(server.url)

    with Ledger.open(tmp_path / "state") as ledger, caplog.at_level(logging.INFO):
        daemon = Daemon(kit, ledger, Redactor(kit.secrets()))
        with pytest.raises(HubError, match="cap; refused while reading"):
            claim_once(daemon)

    assert PENDING_REPLY_CAP >= 64 * 1024 * 1024
    assert server.sent < 128 * 1024 * 1024, "the reply was read to its end, not refused"
    assert any(STUCK_ON_THE_HUB in m for m in errors_logged(caplog))


def drip_forever(connection: socket.socket, server: RawHub) -> None:
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    )
    while True:
        connection.sendall(b" ")
        time.sleep(0.02)


def cut_off_mid_body(connection: socket.socket, server: RawHub) -> None:
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        + IDENTITY_BYTES
    )
    connection.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (drip_forever, "did not finish within 1 s"),
        (cut_off_mid_body, "closed before the reply was complete"),
    ],
    ids=["drips-forever", "cut-off-mid-body"],
)
def test_poll_reply_that_never_finishes_is_cut_at_the_wall_clock_deadline_and_named_stuck(
    raw_hub: Callable[..., RawHub],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    script: Callable[[socket.socket, RawHub], None],
    reason: str,
) -> None:
    kit = kit_for(raw_hub(script).url)
    started = time.monotonic()

    with Ledger.open(tmp_path / "state") as ledger, caplog.at_level(logging.INFO):
        daemon = Daemon(kit, ledger, Redactor(kit.secrets()))
        # The read timeout (5 s) never fires on a drip: only the wall-clock deadline does.
        with pytest.raises(HubError, match=reason):
            claim_once(daemon, read_timeout=5.0, reply_deadline=1.0)

    assert time.monotonic() - started < 4.0
    assert any(STUCK_ON_THE_HUB in m for m in errors_logged(caplog))


def odd_content_length(connection: socket.socket, server: RawHub) -> None:
    body = IDENTITY_BYTES + b'"tasks": []}'
    # "²" is a digit to str.isdigit() but not to int(): it once crashed both clients.
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \xb2\r\n"
        b"Connection: close\r\n\r\n" + body
    )
    connection.shutdown(socket.SHUT_RDWR)


def test_content_length_that_is_not_a_plain_number_does_not_crash_either_client(
    raw_hub: Callable[..., RawHub],
) -> None:
    server = raw_hub(odd_content_length)
    kit = kit_for(server.url)

    hub_client = HubClient(kit, threading.Event())
    try:
        found, tasks = hub_client.pending_tasks(None)
    finally:
        hub_client.close()
    with ServiceClient(kit) as services:
        reply = services.call("GET", f"{server.url}/retrieval/import_status_count/P1")

    assert (found.trust_name, tasks) == ("T1", [])
    assert reply.json()["tasks"] == []


@pytest.mark.parametrize(
    ("outage", "reason"),
    [("reset", "closed without a reply"), ("hang", "did not answer in time")],
)
def test_reset_or_hung_hub_is_a_hub_error_and_nothing_is_called_stuck(
    hub: LoopbackHub,
    write_kit: KitWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    outage: str,
    reason: str,
) -> None:
    hub.set_outage(outage, ("/tasks/pending",))
    try:
        with (
            in_process(write_kit(), tmp_path / "state") as daemon,
            caplog.at_level(logging.INFO),
            pytest.raises(HubError, match=reason),
        ):
            claim_once(daemon, read_timeout=0.5)
    finally:
        hub.set_outage(None)
    assert not any("poll refused" in m for m in errors_logged(caplog))


# --- tasks in a poll: each broken one is failed with its reason, or skipped when it has no id ---


def test_broken_tasks_in_a_poll_each_get_one_clear_result_and_the_rest_run(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = [
        "good",
        "duplicate",
        "no_type",
        "no_payload",
        "type_not_text",
        "payload_not_text",
        "type_too_long",
        "payload_not_a_string",
        "created_at_not_text",
    ]
    ids = {
        name: hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})
        for name in names
    }
    wire = {task["id"]: task for task in hand_out(hub)}
    task = {name: wire[task_id] for name, task_id in ids.items()}
    without = lambda name, field: {k: v for k, v in task[name].items() if k != field}  # noqa: E731
    items = [
        task["good"],
        task["duplicate"],
        {**task["duplicate"], "payload": "a second, different copy"},
        without("no_type", "task_type"),
        without("no_payload", "payload"),
        {**task["type_not_text"], "task_type": "delete_imaging\ud800"},
        {**task["payload_not_text"], "payload": "\udfff" + task["payload_not_text"]["payload"]},
        {**task["type_too_long"], "task_type": "x" * 5000},
        {**task["payload_not_a_string"], "payload": {"v": 1, "kid": "shared"}},
        {**task["created_at_not_text"], "created_at": "\ud800"},
        {"task_type": "delete_imaging", "payload": task["good"]["payload"]},
        {"id": "task-17", "task_type": "delete_imaging", "payload": task["good"]["payload"]},
    ]
    reply = json.dumps({**identity(hub), "tasks": items}).encode()
    answer_next_poll(hub, 200, "application/json", reply)

    with in_process(write_kit(), tmp_path / "state") as daemon, caplog.at_level(logging.INFO):
        daemon.once()
        settled = {entry.id: entry.state for entry in daemon.ledger.in_state()}

    expected_errors = {
        "no_type": "task has no task_type",
        "no_payload": "task has no payload",
        "type_not_text": "task_type is not valid text (it holds a lone UTF-16 surrogate)",
        "payload_not_text": "payload is not an envelope: payload is not base64",
        "type_too_long": "task_type is too long to be a task type (5,000 characters)",
        "payload_not_a_string": "payload is not an envelope: not a string",
    }
    for name, error in expected_errors.items():
        assert hub.task(ids[name]).status == "FAILED", name
        assert error_of(hub, ids[name]) == {"error": error}, name
    for name in ("good", "duplicate", "created_at_not_text"):
        assert hub.task(ids[name]).status == "COMPLETED", name
    for name, task_id in ids.items():
        assert len(result_posts(hub, task_id)) == 1, name
        assert settled[task_id] is TaskState.ACKNOWLEDGED, name
    assert len(settled) == len(ids)  # the two items without a usable id were never recorded
    assert len([c for c in services.calls if c.method == "DELETE"]) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("has no usable id and cannot be run or reported" in m for m in messages) == 2
    assert any(f"{ids['duplicate']} appears twice in one reply" in m for m in messages)
    assert not any("x" * 200 in m for m in messages), "a hostile task_type was logged whole"


# --- payloads: every rejection reason of the protocol page, before any handler runs -------------


def _envelope(fields: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(fields).encode()).decode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def rejected_payloads(key: bytes) -> dict[str, tuple[str, str]]:
    """Envelope for a delete_imaging task -> the reason its failed result must carry."""
    nonce = _b64(bytes(12))
    sealed = crypto.seal_envelope(key, b"{}", crypto.task_context("delete_imaging"))
    fields = json.loads(base64.b64decode(sealed))
    ct = bytearray(base64.b64decode(fields["ct"]))
    ct[0] ^= 1
    not_an_envelope = "payload is not an envelope: "
    seal = lambda plaintext: crypto.seal_envelope(  # noqa: E731
        key, plaintext, crypto.task_context("delete_imaging")
    )
    return {
        "not-base64": ("not base64 at all!", not_an_envelope + "payload is not base64"),
        "base64-of-text": (_b64(b"hello"), not_an_envelope + "not JSON"),
        "json-not-an-object": (_b64(b"[1, 2]"), not_an_envelope + "not a JSON object"),
        "nested-past-the-stack": (
            _b64(b"[" * 100_000 + b"]" * 100_000),
            not_an_envelope + "not JSON",
        ),
        "v-missing": (
            _envelope({"kid": "shared", "iv": nonce, "ct": "AA=="}),
            not_an_envelope + "'v' missing or not an integer",
        ),
        "v-a-bool": (
            _envelope({"v": True, "kid": "shared", "iv": nonce, "ct": "AA=="}),
            not_an_envelope + "'v' missing or not an integer",
        ),
        "kid-not-a-string": (
            _envelope({"v": 1, "kid": 7, "iv": nonce, "ct": "AA=="}),
            not_an_envelope + "'kid' missing or not a string",
        ),
        "iv-missing": (
            _envelope({"v": 1, "kid": "shared", "ct": "AA=="}),
            not_an_envelope + "'iv' missing or not a string",
        ),
        "ct-missing": (
            _envelope({"v": 1, "kid": "shared", "iv": nonce}),
            not_an_envelope + "'ct' missing or not a string",
        ),
        "version-2": (
            _envelope({**fields, "v": 2}),
            "unsupported envelope version 2",
        ),
        "unknown-kid": (
            _envelope({**fields, "kid": "rotated-2027"}),
            "unknown key id 'rotated-2027'",
        ),
        "nonce-16-bytes": (
            _envelope({**fields, "iv": _b64(bytes(16))}),
            "nonce is 16 bytes, expected 12",
        ),
        "tampered": (_envelope({**fields, "ct": _b64(bytes(ct))}), "payload failed authentication"),
        "another-key": (
            crypto.seal_envelope(bytes(32), b"{}", crypto.task_context("delete_imaging")),
            "payload failed authentication",
        ),
        "sealed-for-another-task-type": (
            crypto.seal_envelope(key, b"{}", crypto.task_context("get_imaging_status")),
            "payload failed authentication",
        ),
        "plaintext-not-json": (seal(b"imaging_project_id=1"), "payload plaintext is not JSON"),
        "plaintext-not-an-object": (seal(b'["x"]'), "payload plaintext is not a JSON object"),
    }


def test_every_payload_rejection_fails_its_task_with_the_reason_before_any_handler_runs(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cases = rejected_payloads(hub.aes_key)
    ids = {
        name: hub.enqueue_envelope("delete_imaging", envelope)
        for name, (envelope, _) in cases.items()
    }

    with in_process(write_kit(), tmp_path / "state") as daemon, caplog.at_level(logging.INFO):
        summary = daemon.once()

    assert summary.unsent == []
    for name, (_, reason) in cases.items():
        task = hub.task(ids[name])
        assert task.status == "FAILED", name
        error = error_of(hub, ids[name])
        assert error["error"].startswith(reason), (name, error)
        assert "status_code" not in error, name
        told = f"task {ids[name]} (delete_imaging) rejected: failed: {reason[:100]}"
        assert any(
            told in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
        ), name
    assert [c for c in services.calls if c.path.startswith("/projects")] == []


# --- trust services: error pages, odd successes, silence, refusal, size --------------------------


def error_page(status: int, title: str) -> bytes:
    return (
        f"<html><head><title>{status} {title}</title><style>body {{ color: red }}</style>"
        f"</head><body>\n<h1>{title}</h1>\n<hr><p>nginx</p></body></html>"
    ).encode()


def test_service_error_pages_fail_the_task_with_the_status_and_a_short_excerpt(
    hub: LoopbackHub,
    services: LoopbackServices,
    write_kit: KitWriter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    titles = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}
    ids = {}
    for status, title in titles.items():
        project = str(uuid.uuid4())
        services.set_failure(f"/projects/{project}", status, error_page(status, title), "text/html")
        ids[status] = hub.enqueue("delete_imaging", {"imaging_project_id": project})

    with in_process(write_kit(), tmp_path / "state") as daemon, caplog.at_level(logging.INFO):
        daemon.once()

    for status, title in titles.items():
        error = error_of(hub, ids[status])
        assert hub.task(ids[status]).status == "FAILED"
        assert error == {
            "error": f"imaging-api answered {status}: {status} {title} {title} nginx",
            "status_code": status,
        }
        told = f"task {ids[status]} (delete_imaging) failed: imaging-api answered {status}"
        assert any(told in r.getMessage() for r in caplog.records)


def test_empty_204_is_a_success_where_no_answer_is_needed_and_non_json_200_fails_clearly(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    for prefix in ("/projects/", "/retrieval/", "/users"):
        services.set_failure(prefix, 204, b"")
    services.set_failure(
        "/projects/create-project", 200, b"<html>Welcome to XNAT</html>", "text/html"
    )
    project = str(uuid.uuid4())
    succeed = [
        hub.enqueue("delete_imaging", {"imaging_project_id": project}),
        hub.enqueue("reimport_studies", {"imaging_project_id": project, "encoded_query": "cT0x"}),
        hub.enqueue("update_user_profile", {"email": "ada@example.org", "enabled": True}),
    ]
    status = hub.enqueue("get_imaging_status", {"imaging_project_id": "P", "encoded_query": "q"})
    create = hub.enqueue(
        "create_imaging",
        {
            "project_id": str(uuid.uuid4()),
            "trust_id": hub.trust_id,
            "project_name": "Chest CT",
            "query": None,
            "users": [],
        },
    )

    with in_process(write_kit(), tmp_path / "state") as daemon:
        daemon.once()

    for task_id in succeed:
        assert (hub.task(task_id).status, hub.task(task_id).result) == ("COMPLETED", None)
    assert error_of(hub, status) == {
        "error": "imaging-api answered 204 with an empty body, JSON was expected"
    }
    assert error_of(hub, create) == {
        "error": "imaging-api answered 200 with a body that is not JSON, JSON was expected"
    }


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_silent_or_refusing_services_fail_the_task_saying_which_and_why(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    services.set_delay("/retrieval/import_status_count/", 5)
    kit = write_kit(
        DATA_ACCESS_API_URL=f"http://127.0.0.1:{_closed_port()}",
        INTERNAL_REQUEST_TIMEOUT_SECONDS="0.3",
    )
    slow = hub.enqueue("get_imaging_status", {"imaging_project_id": "P", "encoded_query": "q"})
    query_id = str(uuid.uuid4())
    refused = hub.enqueue(
        "cohort_query",
        {
            "encrypted_project_id": "e",
            "query_id": query_id,
            "query_name": "q",
            "query": "SELECT 1",
            "trust_id": hub.trust_id,
        },
    )

    with in_process(kit, tmp_path / "state") as daemon:
        daemon.once()

    assert error_of(hub, slow) == {"error": "imaging-api did not answer within 0.3 s"}
    assert error_of(hub, refused) == {"error": "data-access-api unreachable: connection refused"}
    report = hub.cohort_results[(query_id, hub.trust_id)]
    assert report["error"] == "502: internal_error: data-access-api unreachable: connection refused"
    assert report["record_count"] == 0


def test_result_too_large_for_the_hub_becomes_a_short_clear_failure(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    # 3.4 MB on the wire (under the 10 MB read cap), but 10.2 million characters as JSON text.
    body = json.dumps("é" * 1_700_000, ensure_ascii=False).encode()
    services.override = lambda method, path, _: (
        (200, {"Content-Type": "application/json"}, body)
        if "/import_status_count/" in path
        else None
    )
    task_id = hub.enqueue("get_imaging_status", {"imaging_project_id": "P", "encoded_query": "q"})

    with in_process(write_kit(), tmp_path / "state") as daemon:
        daemon.once()

    assert len(body) < 10_000_000
    assert hub.task(task_id).status == "FAILED"
    assert error_of(hub, task_id) == {
        "error": f"result too large to send: {10_200_002:,} characters, the hub accepts at most "
        f"{MAX_RESULT_CHARS:,}"
    }
    (posted,) = result_posts(hub, task_id)
    assert len(json.dumps(posted)) < 300


# --- bounded error text: capped, the upstream status kept, no secret, no URL credentials --------


def test_failure_reasons_sent_to_the_hub_are_capped_keep_the_status_and_carry_no_secret(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    kit_path = write_kit(INTERNAL_REQUEST_TIMEOUT_SECONDS="0.3")
    kit = load_kit(kit_path)
    internal_b64 = base64.b64encode(kit.internal_service_key.encode()).decode()
    echoed = (
        f"headers: {kit.api_key_header}: {kit.api_key}; "
        f"{kit.internal_service_key_header}: {internal_b64}; "
        f"key={requests.utils.quote(kit.aes_key_base64, safe='')}; "
        "dsn=postgresql://omop:Sup3rS3cret!@omop-db:5432/omop; "
    )
    detail = echoed + "traceback line\n" * 500
    services.set_failure("/retrieval/reimport", 500, json.dumps({"detail": detail}).encode())
    services.set_failure("/cohort", 500, json.dumps({"detail": "query_failed: " + detail}).encode())
    services.set_delay("/projects/create-project", 5)
    reimport = hub.enqueue("reimport_studies", {"imaging_project_id": "P", "encoded_query": "q"})
    query_id = str(uuid.uuid4())
    cohort = hub.enqueue(
        "cohort_query",
        {
            "encrypted_project_id": "e",
            "query_id": query_id,
            "query_name": "q",
            "query": "SELECT 1",
            "trust_id": hub.trust_id,
        },
    )
    create = hub.enqueue(
        "create_imaging",
        {
            "project_id": str(uuid.uuid4()),
            "trust_id": hub.trust_id,
            "project_name": "Chest CT " + "very long name " * 2000,
            "query": None,
            "users": [],
        },
    )

    with in_process(kit_path, tmp_path / "state") as daemon:
        daemon.once()

    reimport_error, cohort_error = error_of(hub, reimport), error_of(hub, cohort)
    assert reimport_error["status_code"] == 500
    assert reimport_error["error"].startswith("imaging-api answered 500: headers: ")
    assert cohort_error["status_code"] == 500
    cohort_report = hub.cohort_results[(query_id, hub.trust_id)]["error"]
    assert cohort_report.startswith("500: query_failed: headers: ")
    assert len(cohort_report) <= 500
    create_error = error_of(hub, create)["error"]
    assert MAX_ERROR_CHARS - 20 < len(create_error) <= MAX_ERROR_CHARS
    assert create_error.endswith("[truncated]")
    assert "status_code" not in error_of(hub, create)  # a timeout has no upstream status
    sent = json.dumps([r.json() for r in hub.requests_log if r.method == "POST" and r.body])
    assert MASK in sent
    for secret in kit.secrets():
        for form in (
            secret,
            base64.b64encode(secret.encode()).decode().rstrip("="),
            requests.utils.quote(secret, safe=""),
        ):
            assert form not in sent
    assert "Sup3rS3cret" not in sent
    for task_id in (reimport, cohort, create):
        assert len(error_of(hub, task_id)["error"]) <= MAX_ERROR_CHARS


# --- the kit: every validation error kit.py can raise --------------------------------------------

KIT_API_KEY = "kit-canary-tK3x9Qv_ZpL0aW7cR2mN5bY8dF1gH4j"
KIT_VALUES = {
    "CENTRAL_HUB_API_URL": "https://hub.example.org/api",
    "TRUST_API_KEY": KIT_API_KEY,
    "TRUST_API_KEY_HEADER": "Authorization",
    "AES_KEY_BASE64": base64.b64encode(bytes(range(32))).decode(),
    "TRUST_INTERNAL_SERVICE_KEY": "kit-canary-internal-9f8e7d6c5b4a",
}
Prepare = Callable[[Path, pytest.MonkeyPatch], Path]


def kit_file(**overrides: str | None) -> Prepare:
    def prepare(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        values = {**KIT_VALUES, **overrides}
        path = folder / "kit.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items() if v is not None))
        path.chmod(0o600)
        return path

    return prepare


def kit_read_fails(error: OSError) -> Prepare:
    def prepare(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        path = kit_file()(folder, monkeypatch)

        def refuse(self: Path) -> bytes:
            raise error

        monkeypatch.setattr(Path, "read_bytes", refuse)
        return path

    return prepare


def kit_bytes(content: bytes, mode: int = 0o600) -> Prepare:
    def prepare(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        path = folder / "kit.env"
        path.write_bytes(content)
        path.chmod(mode)
        return path

    return prepare


def kit_with_a_bundle_that_is_no_certificate(folder: Path, mp: pytest.MonkeyPatch) -> Path:
    bundle = folder / "hub-ca.pem"
    bundle.write_text("this is not a PEM certificate\n")
    return kit_file(HUB_CA_BUNDLE=str(bundle))(folder, mp)


def kit_writable_by_others(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = kit_file()(folder, monkeypatch)
    os.chmod(path, 0o606)  # noqa: S103 - the unsafe mode is the point of the case
    return path


# case -> (how to make the kit, the key the message must name or None, a value it must not echo)
KIT_CASES: dict[str, tuple[Prepare, str | None, str | None]] = {
    "required-key-missing": (kit_file(TRUST_API_KEY=None), "TRUST_API_KEY", None),
    "header-name-missing": (kit_file(TRUST_API_KEY_HEADER=None), "TRUST_API_KEY_HEADER", None),
    "secret-with-a-space": (
        kit_file(TRUST_API_KEY='"kit-canary abc123xyz"'),
        "TRUST_API_KEY",
        "kit-canary abc123xyz",
    ),
    "header-name-invalid": (
        kit_file(TRUST_INTERNAL_SERVICE_KEY_HEADER="X-Key:"),
        "TRUST_INTERNAL_SERVICE_KEY_HEADER",
        None,
    ),
    "number-not-a-number": (
        kit_file(COHORT_QUERY_TIMEOUT_SECONDS="5min"),
        "COHORT_QUERY_TIMEOUT_SECONDS",
        None,
    ),
    "number-not-positive": (kit_file(DRAIN_TIMEOUT_SECONDS="0"), "DRAIN_TIMEOUT_SECONDS", None),
    "integer-not-whole": (kit_file(MAX_CONCURRENT_TASKS="2.5"), "MAX_CONCURRENT_TASKS", None),
    "integer-out-of-range": (
        kit_file(HEALTH_PROBE_DEGRADED_MS="2000000"),
        "HEALTH_PROBE_DEGRADED_MS",
        None,
    ),
    "service-url-with-credentials": (
        kit_file(XNAT_URL="http://admin:xnat-canary-pw@xnat-web:8080"),
        "XNAT_URL",
        "xnat-canary-pw",
    ),
    "service-url-not-http": (kit_file(IMAGING_API_URL="imaging-api:8000"), "IMAGING_API_URL", None),
    "hub-url-with-credentials": (
        kit_file(CENTRAL_HUB_API_URL="https://trust:hub-canary-pw@hub.example.org/api"),
        "CENTRAL_HUB_API_URL",
        "hub-canary-pw",
    ),
    "hub-url-not-a-plain-base": (
        kit_file(CENTRAL_HUB_API_URL="https://hub.example.org/api?x=1"),
        "CENTRAL_HUB_API_URL",
        None,
    ),
    "hub-url-plain-http": (
        kit_file(CENTRAL_HUB_API_URL="http://hub.example.org/api"),
        "CENTRAL_HUB_API_URL",
        None,
    ),
    "hub-url-other-scheme": (
        kit_file(CENTRAL_HUB_API_URL="ftp://hub.example.org/api"),
        "CENTRAL_HUB_API_URL",
        None,
    ),
    "aes-key-not-base64": (
        kit_file(AES_KEY_BASE64="kit-canary-not*base64"),
        "AES_KEY_BASE64",
        "kit-canary-not*base64",
    ),
    "aes-key-16-bytes": (
        kit_file(AES_KEY_BASE64=base64.b64encode(bytes(16)).decode()),
        "AES_KEY_BASE64",
        base64.b64encode(bytes(16)).decode(),
    ),
    "expected-trust-id-not-a-uuid": (
        kit_file(EXPECTED_TRUST_ID="trust-17"),
        "EXPECTED_TRUST_ID",
        None,
    ),
    "hub-ca-bundle-missing": (
        kit_file(HUB_CA_BUNDLE="/nonexistent/hub-ca.pem"),
        "HUB_CA_BUNDLE",
        None,
    ),
    "hub-ca-bundle-not-a-certificate": (
        kit_with_a_bundle_that_is_no_certificate,
        "HUB_CA_BUNDLE",
        None,
    ),
    "kit-file-missing": (lambda folder, _: folder / "absent.env", None, None),
    "kit-file-denied": (kit_read_fails(PermissionError(13, "Permission denied")), None, None),
    "kit-path-a-directory": (lambda folder, _: folder, None, None),
    "kit-file-not-utf8": (kit_bytes(b"TRUST_API_KEY=\xff\xfe\n"), None, None),
    "kit-file-io-error": (kit_read_fails(OSError(5, "Input/output error")), None, None),
    "kit-file-writable-by-others": (kit_writable_by_others, None, None),
}


def kit_error_of(prepare: Prepare, folder: Path, monkeypatch: pytest.MonkeyPatch) -> KitError:
    path = prepare(folder, monkeypatch)
    with pytest.raises(KitError) as caught:
        load_kit(path)
    return caught.value


@pytest.mark.parametrize(("prepare", "key", "hidden"), KIT_CASES.values(), ids=KIT_CASES.keys())
def test_every_kit_validation_error_names_the_key_the_file_and_the_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prepare: Prepare,
    key: str | None,
    hidden: str | None,
) -> None:
    error = kit_error_of(prepare, tmp_path, monkeypatch)
    message = str(error)

    assert error.exit_code == EXIT_CONFIG
    assert message.startswith("kit error: ")
    assert str(tmp_path) in message
    assert "; fix: " in message
    if key is not None:
        assert error.key == key
        assert f"{key} in " in message
    for secret in (hidden, KIT_API_KEY, KIT_VALUES["TRUST_INTERNAL_SERVICE_KEY"]):
        assert secret is None or secret not in message


def _kit_error_sites() -> set[int]:
    """Lines of kit.py that raise a KitError (`raise self.fail(...)` / `raise KitError(...)`)."""
    sites = set()
    for node in ast.walk(ast.parse(KIT_SOURCE.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            called = node.exc.func
            if (isinstance(called, ast.Attribute) and called.attr == "fail") or (
                isinstance(called, ast.Name) and called.id == "KitError"
            ):
                sites.add(node.lineno)
    return sites


def test_the_kit_cases_reach_every_validation_error_kit_py_can_raise(tmp_path: Path) -> None:
    reached = set()
    for name, (prepare, _, _) in KIT_CASES.items():
        folder = tmp_path / name
        folder.mkdir()
        with pytest.MonkeyPatch.context() as monkeypatch:
            error = kit_error_of(prepare, folder, monkeypatch)
        in_kit_py = [
            frame
            for frame in traceback.extract_tb(error.__traceback__)
            if Path(frame.filename).resolve() == KIT_SOURCE
        ]
        reached.add(in_kit_py[-1].lineno)

    missing = _kit_error_sites() - reached
    assert not missing, (
        f"kit.py raises a KitError at lines {sorted(missing)} that no KIT_CASES entry reaches: "
        "add a case, and a row to the README's 'When things go wrong' table"
    )


def test_service_error_detail_cut_inside_an_echoed_secret_leaks_no_piece_of_it(
    services: LoopbackServices, write_kit: KitWriter
) -> None:
    kit = load_kit(write_kit())
    secret = kit.internal_service_key
    detail = "x" * (300 - len(secret) // 2) + secret  # the 300-character excerpt ends mid-key
    services.set_failure("/users", 500, json.dumps({"detail": detail}).encode())

    with ServiceClient(kit) as client, pytest.raises(ServiceError) as failed:
        client.call("PUT", f"{kit.imaging_api_url}/users", json={})

    assert failed.value.status_code == 500
    assert MASK in failed.value.reason
    assert secret[:8] not in failed.value.reason


def test_nan_or_infinity_from_a_service_cannot_jam_the_outbox(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path
) -> None:
    query_id = str(uuid.uuid4())
    # Python reads these non-standard tokens; a body holding them could never be posted on.
    answer = (
        f'{{"query_id": "{query_id}", "trust_id": "{hub.trust_id}", "created": "2026-01-01", '
        '"record_count": Infinity, "data": [], "error": null, "suppressed": NaN}'
    )
    services.set_failure("/cohort", 200, answer.encode())
    cohort = hub.enqueue(
        "cohort_query",
        {
            "encrypted_project_id": "e",
            "query_id": query_id,
            "query_name": "q",
            "query": "SELECT 1",
            "trust_id": hub.trust_id,
        },
    )
    later = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})

    with in_process(write_kit(), tmp_path / "state") as daemon:
        summary = daemon.once()

    assert summary.unsent == []
    assert hub.task(cohort).status == "FAILED"
    assert error_of(hub, cohort)["error"].startswith("the hub refused the cohort results (")
    assert hub.cohort_results[(query_id, hub.trust_id)]["error"].startswith("422: ")
    assert hub.task(later).status == "COMPLETED"


@pytest.mark.parametrize("depth", [65, 100_000], ids=["past-the-limit", "past-the-stack"])
def test_service_json_nested_too_deep_fails_the_task_clearly(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, tmp_path: Path, depth: int
) -> None:
    services.set_failure("/retrieval/import_status_count/", 200, b"[" * depth + b"]" * depth)
    task_id = hub.enqueue("get_imaging_status", {"imaging_project_id": "P", "encoded_query": "q"})

    with in_process(write_kit(), tmp_path / "state") as daemon:
        daemon.once()

    assert error_of(hub, task_id) == {
        "error": "imaging-api answered 200 with JSON nested more than 64 levels deep"
    }


def test_hub_refusal_detail_is_scrubbed_before_it_is_cut(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    kit = load_kit(write_kit())
    detail = "x" * (300 - len(kit.api_key) // 2) + kit.api_key  # the 300-character cut is mid-key
    hub.override = lambda method, path, _: (
        (409, {"Content-Type": "application/json"}, json.dumps({"detail": detail}).encode())
        if path.endswith("/result")
        else None
    )
    client = HubClient(kit, threading.Event())
    try:
        with pytest.raises(HubError) as refused:
            client.report_result(None, str(uuid.uuid4()), {"success": True, "result": None})
    finally:
        client.close()

    assert MASK in refused.value.reason
    assert kit.api_key[:8] not in refused.value.reason


def test_secret_in_a_cohort_answers_keys_is_masked_and_deep_payloads_are_stored_as_a_note() -> None:
    secret = "internal-canary-" + "s" * 20
    outcome = prepare_for_hub(
        Outcome(True, None, {"data": [], f"echo {secret}": {secret: 1}}), Redactor([secret])
    )
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]

    assert outcome.cohort_post is not None
    assert secret not in json.dumps(outcome.cohort_post)
    assert envelope_text(deep) == "<a list payload that cannot be stored as text>"


def test_identity_that_is_not_valid_text_is_no_identity_and_nothing_is_stored(
    hub: LoopbackHub, write_kit: KitWriter, tmp_path: Path
) -> None:
    reply = json.dumps({"trust_id": "\ud800", "trust_name": "T", "message": "ok"}).encode()
    hub.override = lambda method, path, _: (
        (200, {"Content-Type": "application/json"}, reply) if path.endswith("/heartbeat") else None
    )

    with in_process(write_kit(EXPECTED_TRUST_ID=None), tmp_path / "state") as daemon:
        with pytest.raises(HubError, match="carries no trust_id/trust_name"):
            daemon.once()
        assert daemon.ledger.stored_trust_id() is None
    assert hub.count("GET", "/tasks/pending") == 0
