"""Property-based: arbitrary hub replies and arbitrary task fields through whole `once` cycles.

For every generated example: no exception escapes but the documented exit-code errors, every
task with a usable id ends with exactly one result body (re-sent byte for byte when it must be
re-sent), and no canary secret, in any encoded form, appears in a log line or a body sent to
the hub. The hub and the trust services are `responses` mocks; everything else is real.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock
from urllib.parse import quote, quote_plus

import requests
import responses
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tenacity import wait_none

from trust_poller import crypto, reporter
from trust_poller.errors import TrustPollerError
from trust_poller.handlers import HANDLERS
from trust_poller.hub import HubError
from trust_poller.ledger import Ledger, TaskState
from trust_poller.logs import setup_logging
from trust_poller.playground.demo import demo_payloads
from trust_poller.playground.kits import kit_in_memory
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.poller import Daemon
from trust_poller.redact import MASK, Redactor

HUB = "https://hub.test/api"
SERVICES = "http://services.test"
TRUST_ID = "6f1c2b4e-8a9d-4c3b-9e7f-0a1b2c3d4e5f"
IDENTITY = {"trust_id": TRUST_ID, "trust_name": "Property Trust"}
AES_KEY = bytes(range(7, 39))
KIT = kit_in_memory(
    aes_key=AES_KEY,
    hub_url=HUB,
    api_key="hub-canary-QmFzZTY0LXNhZmUtdG9rZW4tZm9yLXRlc3Rz",
    internal_service_key="internal-canary-Zm9yLXRydXN0LXNlcnZpY2Vz",
    data_access_api_url=SERVICES,
    imaging_api_url=SERVICES,
    xnat_url=SERVICES,
    internal_request_timeout=2.0,
    cohort_query_timeout=2.0,
    hub_heartbeats_per_minute=60_000,
    hub_polls_per_minute=60_000,
    hub_results_per_minute=60_000,
)


def property_settings(examples: int) -> settings:
    """Fixed examples (derandomized, no example database) so CI runs the same cases each time."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Problems that mean trust-poller itself broke, whatever the input.
CRASH_MARKERS = ("crashed its worker", "internal error", "Traceback", "Unhandled")


def encoded_forms(secret: str) -> set[str]:
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        forms |= {encode(raw).decode(), encode(raw).decode().rstrip("=")}
    return forms


CANARY_FORMS = sorted({form for secret in KIT.secrets() for form in encoded_forms(secret)})


def leaked(text: str) -> list[str]:
    return [form for form in CANARY_FORMS if form in text]


# --- the hub and the trust services, scripted ---------------------------------------------------


@dataclass
class Scripted:
    """One example's hub and services: what they answer, and everything they were sent."""

    poll: tuple[int, str, bytes]
    service_replies: list[tuple[int, str, bytes] | None]
    result_troubles: int = 0
    requeue_first: bool = False
    redeliver: list[Any] = field(default_factory=list)
    results: dict[str, list[bytes]] = field(default_factory=dict)
    acknowledged: dict[str, int] = field(default_factory=dict)
    cohort_bodies: list[bytes] = field(default_factory=list)
    polls: int = 0
    service_calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, rsps: responses.RequestsMock) -> None:
        rsps.add_callback("POST", f"{HUB}/trust/heartbeat", callback=self._heartbeat)
        rsps.add_callback("GET", f"{HUB}/tasks/pending", callback=self._poll)
        rsps.add_callback("POST", re.compile(rf"{re.escape(HUB)}/tasks/.+/result"), self._result)
        rsps.add_callback("POST", f"{HUB}/cohort/results", callback=self._cohort)
        for method in ("GET", "POST", "PUT", "DELETE"):
            rsps.add_callback(method, re.compile(re.escape(SERVICES) + ".*"), self._service)

    def _heartbeat(self, request: requests.PreparedRequest) -> Any:
        return 200, {"Content-Type": "application/json"}, json.dumps(IDENTITY)

    def _poll(self, request: requests.PreparedRequest) -> Any:
        with self._lock:
            self.polls += 1
            first = self.polls == 1
        if first:
            status, content_type, body = self.poll
            return status, {"Content-Type": content_type}, body
        tasks, self.redeliver = self.redeliver, []
        return 200, {"Content-Type": "application/json"}, json.dumps({**IDENTITY, "tasks": tasks})

    def _result(self, request: requests.PreparedRequest) -> Any:
        task_id = str(request.url).rsplit("/", 2)[-2]
        body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
        with self._lock:
            attempts = self.results.setdefault(task_id, [])
            attempts.append(body)
            attempt = len(attempts)
        if self.requeue_first and attempt == 1:
            detail = f"Task {task_id} is not in progress (status: PENDING)"
            return 409, {"Content-Type": "application/json"}, json.dumps({"detail": detail})
        if attempt <= self.result_troubles:
            return [
                (503, {"Content-Type": "application/json"}, '{"detail": "Service unavailable"}'),
                (502, {"Content-Type": "text/html"}, "<html><h1>502 Bad Gateway</h1></html>"),
                (0, {}, requests.ConnectionError("Connection reset by peer")),
            ][attempt % 3]
        with self._lock:
            self.acknowledged[task_id] = self.acknowledged.get(task_id, 0) + 1
        message = f"Task {task_id} result recorded"
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps({**IDENTITY, "message": message}),
        )

    def _cohort(self, request: requests.PreparedRequest) -> Any:
        body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
        with self._lock:
            self.cohort_bodies.append(body)
        return 200, {"Content-Type": "application/json"}, '{"message": "ok"}'

    def _service(self, request: requests.PreparedRequest) -> Any:
        with self._lock:
            reply = self.service_replies[self.service_calls % len(self.service_replies)]
            self.service_calls += 1
        if reply is None:
            return 0, {}, requests.ConnectionError("[Errno 111] Connection refused")
        status, content_type, body = reply
        return status, {"Content-Type": content_type}, body


@contextlib.contextmanager
def project_logging() -> Iterator[io.StringIO]:
    """trust-poller's own redacting handler at DEBUG, writing to a buffer; restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    redactor = setup_logging(verbose=True, stream=buffer)
    redactor.add(KIT.secrets())
    try:
        yield buffer
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


@dataclass
class Cycle:
    raised: TrustPollerError | None
    hub: Scripted
    log: str
    ledger_states: dict[str, TaskState]


def run_cycles(hub: Scripted, log: io.StringIO, rounds: int = 1) -> Cycle:
    """`once` up to `rounds` times on one state directory (each a fresh daemon, as from cron)."""
    log.seek(0)
    log.truncate()
    raised: TrustPollerError | None = None
    with (
        tempfile.TemporaryDirectory() as state,
        responses.RequestsMock(assert_all_requests_are_fired=False) as rsps,
        mock.patch.object(reporter, "wait_exponential_jitter", return_value=wait_none()),
    ):
        hub.install(rsps)
        for _ in range(rounds):
            with Ledger.open(Path(state)) as ledger:
                try:
                    summary = Daemon(KIT, ledger, Redactor(KIT.secrets())).once()
                except TrustPollerError as error:
                    raised = error
                    break
                if not summary.unsent and not hub.redeliver:
                    break
        with Ledger.open(Path(state)) as ledger:
            states = {entry.id: entry.state for entry in ledger.in_state()}
    return Cycle(raised, hub, log.getvalue(), states)


def assert_no_crash_and_no_leak(cycle: Cycle) -> None:
    sent = b"".join([*(b for bodies in cycle.hub.results.values() for b in bodies)])
    sent += b"".join(cycle.hub.cohort_bodies)
    event(f"a canary was masked: logs {MASK in cycle.log}, bodies {MASK.encode() in sent}")
    for marker in CRASH_MARKERS:
        assert marker not in cycle.log, cycle.log
    assert not leaked(cycle.log), cycle.log
    for bodies in cycle.hub.results.values():
        for body in bodies:
            assert not leaked(body.decode()), body
    for body in cycle.hub.cohort_bodies:
        assert not leaked(body.decode()), body


def usable_ids(items: Any) -> list[str]:
    """The protocol's rule, restated: a dict whose `id` is a UUID string; first copy wins."""
    found: list[str] = []
    for item in items if isinstance(items, list) else []:
        raw = item.get("id") if isinstance(item, dict) else None
        if not isinstance(raw, str):
            continue
        try:
            task_id = str(uuid.UUID(raw))
        except ValueError:
            continue
        if task_id not in found:
            found.append(task_id)
    return found


# --- strategies -----------------------------------------------------------------------------------

canary = st.sampled_from(CANARY_FORMS)
lone_surrogate = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
hostile_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=10), canary, st.text(max_size=10)),
    st.builds(lambda a, b: a + b, st.text(max_size=10), lone_surrogate),
    st.integers(1000, 5000).map(lambda n: "x" * n),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), hostile_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)
    ),
    max_leaves=12,
)
TASK_TYPES = sorted(HANDLERS)
# One valid payload per task type, as the demo seals them (it reads only these two fields).
DEMO_PAYLOADS = dict(
    demo_payloads(cast(LoopbackHub, SimpleNamespace(aes_key=AES_KEY, trust_id=TRUST_ID)))
)


def _sealed(task_type: str, plaintext: bytes) -> str:
    return crypto.seal_envelope(AES_KEY, plaintext, crypto.task_context(task_type))


@st.composite
def task_items(draw: st.DrawFn, pool: list[str]) -> Any:
    """One item of a poll's `tasks`: half well-formed, half broken in one place."""
    # cohort_query weighs more: its answer travels on to the hub as a JSON body.
    task_type = draw(st.sampled_from([*TASK_TYPES, "cohort_query", "cohort_query"]))
    plaintext = DEMO_PAYLOADS[task_type]
    item: dict[str, Any] = {
        "id": draw(st.sampled_from(pool)),
        "task_type": task_type,
        "payload": _sealed(task_type, json.dumps(plaintext).encode()),
        "created_at": "2026-01-01T00:00:00Z",
    }
    if draw(st.booleans()):
        return item  # well-formed: only the services' answers can fail it
    broken = draw(
        st.sampled_from(
            ["not-an-object", "id", "task_type", "payload", "plaintext", "created_at", "missing"]
        )
    )
    if broken == "not-an-object":
        return draw(json_values)
    if broken == "id":
        item["id"] = draw(
            st.one_of(
                st.sampled_from(pool).map(str.upper),
                st.sampled_from(pool).map(lambda i: "{" + i + "}"),
                st.sampled_from(pool).map(lambda i: i.replace("-", "")),
                hostile_text,
                json_values,
            )
        )
    elif broken == "task_type":
        item["task_type"] = draw(
            st.one_of(
                st.just("format_disk"), st.sampled_from(TASK_TYPES), hostile_text, json_values
            )
        )
    elif broken == "payload":
        other = "cohort_query" if task_type != "cohort_query" else "delete_imaging"
        item["payload"] = draw(st.one_of(st.just(_sealed(other, b"{}")), hostile_text, json_values))
    elif broken == "plaintext":
        field_name = draw(st.sampled_from(sorted(plaintext)))
        changed = draw(
            st.one_of(
                st.builds(lambda value: {**plaintext, field_name: value}, json_values),
                json_values,
            )
        )
        item["payload"] = _sealed(task_type, json.dumps(changed).encode())
    elif broken == "created_at":
        item["created_at"] = draw(st.one_of(hostile_text, json_values))
    else:
        del item[draw(st.sampled_from(sorted(item)))]
    event(f"task item: {broken}")
    return item


service_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda c: json.dumps({"detail": f"bad header {c}"}).encode(), canary),
    st.builds(lambda c: f"<html><p>key={c}</p></html>".encode(), canary),
    st.binary(max_size=200),
)
# Successful answers that are odd in a way a parser accepts: echoed secrets (values and keys),
# tokens Python reads but JSON forbids, and nesting deep enough to hurt recursive code.
odd_successes = st.one_of(
    st.builds(lambda c: json.dumps({"data": [], "note": c}).encode(), canary),
    st.builds(lambda c: json.dumps({"data": [], c: {"echo": c}}).encode(), canary),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
        lambda token: (
            b'{"record_count": %s, "data": [{"name": "m", "results": '
            b'[{"value": %s, "count": 1}]}]}' % (token, token)
        )
    ),
    st.integers(1, 3000).map(lambda depth: b'{"data": ' + b"[" * depth + b"]" * depth + b"}"),
)
service_reply = st.one_of(
    st.none(),  # connection refused
    st.tuples(
        st.sampled_from([200, 201, 204, 400, 401, 403, 404, 409, 422, 500, 502, 503]),
        st.sampled_from(["application/json", "text/html", "text/plain", ""]),
        service_bodies,
    ),
    st.tuples(st.just(200), st.just("application/json"), odd_successes),
)


# --- the properties -------------------------------------------------------------------------------


POLL_POOL = [str(uuid.UUID(int=n + 50)) for n in range(4)]
poll_shaped = st.lists(task_items(POLL_POOL), max_size=5).map(
    lambda tasks: json.dumps({**IDENTITY, "tasks": tasks}).encode()
)


@property_settings(200)
@given(
    status=st.one_of(
        st.just(200),
        st.just(200),
        st.sampled_from(
            [201, 204, 301, 400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504]
        ),
    ),
    content_type=st.one_of(
        st.just("application/json"),
        st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "APPLICATION/JSON",
                "text/html",
                "text/plain",
                "",
                "application/problem+json",
            ]
        ),
    ),
    body=st.one_of(
        poll_shaped,
        poll_shaped,
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda extra, tasks: json.dumps({**IDENTITY, **extra, "tasks": tasks}).encode(),
            st.dictionaries(hostile_text, json_values, max_size=2),
            json_values,
        ),
        st.builds(lambda c: json.dumps({"detail": f"echo {c}"}).encode(), canary),
        st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    ),
)
def test_any_poll_reply_is_used_or_refused_cleanly_and_leaks_nothing(
    status: int, content_type: str, body: bytes
) -> None:
    hub = Scripted(poll=(status, content_type, body), service_replies=[(204, "", b"")])
    with project_logging() as log:
        cycle = run_cycles(hub, log)

    assert_no_crash_and_no_leak(cycle)
    event(f"poll {type(cycle.raised).__name__ if cycle.raised else 'used'}")
    event(f"results sent: {min(len(hub.results), 3)}{'+' if len(hub.results) > 2 else ''}")
    if cycle.raised is not None:
        assert isinstance(cycle.raised, TrustPollerError)
        assert hub.results == {}  # a refused poll runs and reports nothing
        if isinstance(cycle.raised, HubError) and cycle.raised.reply_unusable:
            assert "stay claimed on the hub until its 30-minute re-queue" in cycle.log
    for task_id, bodies in hub.results.items():
        assert len(set(bodies)) == 1, task_id
        assert hub.acknowledged.get(task_id) == 1, task_id


@property_settings(300)
@given(data=st.data())
def test_any_tasks_each_end_with_exactly_one_result_body_and_no_secret_leaves(
    data: st.DataObject,
) -> None:
    pool = [str(uuid.UUID(int=n + 1)) for n in range(6)]
    items = data.draw(st.lists(task_items(pool), max_size=8), label="tasks")
    replies = data.draw(st.lists(service_reply, min_size=1, max_size=4), label="services")
    reply = json.dumps({**IDENTITY, "tasks": items}).encode()
    hub = Scripted(poll=(200, "application/json", reply), service_replies=replies)

    with project_logging() as log:
        cycle = run_cycles(hub, log)

    assert cycle.raised is None, cycle.log
    assert_no_crash_and_no_leak(cycle)
    expected = usable_ids(items)
    event(f"tasks with a usable id: {min(len(expected), 4)}{'+' if len(expected) > 3 else ''}")
    event(f"service calls made: {'yes' if hub.service_calls else 'no'}")
    assert sorted(hub.results) == sorted(expected)
    for task_id in expected:
        (body,) = hub.results[task_id]
        event("result " + ("success" if json.loads(body)["success"] else "failure"))
        sent = json.loads(body)
        assert set(sent) == {"success", "result"}
        assert isinstance(sent["success"], bool)
        assert sent["result"] is None or isinstance(sent["result"], str)
        assert cycle.ledger_states[task_id] is TaskState.ACKNOWLEDGED
    assert set(cycle.ledger_states) == set(expected)


@property_settings(100)
@given(
    data=st.data(),
    troubles=st.integers(0, 5),
    requeue_first=st.booleans(),
)
def test_a_result_that_must_be_resent_is_resent_identically_until_the_hub_takes_it(
    data: st.DataObject, troubles: int, requeue_first: bool
) -> None:
    pool = [str(uuid.UUID(int=n + 100)) for n in range(4)]
    items = data.draw(st.lists(task_items(pool), min_size=1, max_size=4), label="tasks")
    replies = data.draw(st.lists(service_reply, min_size=1, max_size=3), label="services")
    reply = json.dumps({**IDENTITY, "tasks": items}).encode()
    hub = Scripted(
        poll=(200, "application/json", reply),
        service_replies=replies,
        result_troubles=troubles,
        requeue_first=requeue_first,
    )
    if requeue_first:
        # The hub's reaper re-queued every task: the next poll delivers each one again.
        hub.redeliver = [item for item in items if isinstance(item, dict)]

    with project_logging() as log:
        cycle = run_cycles(hub, log, rounds=6)

    assert cycle.raised is None, cycle.log
    assert_no_crash_and_no_leak(cycle)
    expected = usable_ids(items)
    assert sorted(hub.results) == sorted(expected)
    event(f"most sends of one result: {max((len(b) for b in hub.results.values()), default=0)}")
    for task_id in expected:
        bodies = hub.results[task_id]
        assert len(set(bodies)) == 1, f"re-sent differently: {bodies}"
        assert hub.acknowledged[task_id] == 1
        assert cycle.ledger_states[task_id] is TaskState.ACKNOWLEDGED
