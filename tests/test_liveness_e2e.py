"""Liveness and pace: the real CLI against a loopback hub that enforces its rate limits.

The hub's "minute" is shortened to MINUTE seconds on both sides (LoopbackHub(rate_window=…)
and the kit's HUB_RATE_WINDOW_SECONDS), so budgets bind within a test's few seconds.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trust_poller.playground.harness import Daemon, wait_until
from trust_poller.playground.http_server import RawReply
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices, ServiceCall

KitWriter = Callable[..., Path]
StartDaemon = Callable[..., Daemon]

MINUTE = 2.0
# The published limits (30 heartbeats, 30 polls, 60 results), over the short minute.
LIMITS = {"heartbeats_per_minute": 30.0, "polls_per_minute": 30.0, "results_per_minute": 60.0}
HEARTBEAT, POLL = "/api/trust/heartbeat", "/api/tasks/pending"
LOUD = re.compile(r"^\S+ (WARNING|ERROR|CRITICAL) ", re.MULTILINE)


@pytest.fixture
def hub(request: pytest.FixtureRequest) -> Iterator[LoopbackHub]:
    """Overrides conftest's hub: this one enforces LIMITS (parametrize indirectly to change)."""
    limits = {**LIMITS, **getattr(request, "param", {})}
    with LoopbackHub(trust_name="Test Trust", rate_window=MINUTE, **limits) as server:
        yield server


def paced_kit(
    write_kit: KitWriter, limits: dict[str, float] = LIMITS, **overrides: str | None
) -> Path:
    """A kit whose budgets are exactly the hub's `limits`, over the same short minute."""
    budgets = {
        "HUB_RATE_WINDOW_SECONDS": str(MINUTE),
        "HUB_HEARTBEATS_PER_MINUTE": str(limits["heartbeats_per_minute"]),
        "HUB_POLLS_PER_MINUTE": str(limits["polls_per_minute"]),
        "HUB_RESULTS_PER_MINUTE": str(limits["results_per_minute"]),
    }
    return write_kit(**{**budgets, **overrides})


def started(daemon: Daemon) -> Daemon:
    assert daemon.wait_for_log("authenticated to hub as trust"), daemon.log
    return daemon


def imaging_status() -> dict[str, str]:
    return {"imaging_project_id": str(uuid.uuid4()), "encoded_query": "cT0x"}


def cohort_query(hub: LoopbackHub) -> dict[str, str]:
    return {
        "encrypted_project_id": "sealed-elsewhere",
        "query_id": str(uuid.uuid4()),
        "query_name": "slow one",
        "query": "SELECT 1",
        "trust_id": hub.trust_id,
    }


def attempts(hub: LoopbackHub, path: str, since: float = 0.0, until: float = 1e12) -> list[float]:
    """When requests to `path` arrived (refused or failed ones too)."""
    return [r.at for r in hub.requests_log if r.route == path and since <= r.at <= until]


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def calls_to(services: LoopbackServices, prefix: str) -> list[ServiceCall]:
    return [call for call in services.calls if call.path.startswith(prefix)]


def all_completed(hub: LoopbackHub, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(hub.task(task_id).status == "COMPLETED" for task_id in ids)


def no_429s(hub: LoopbackHub) -> None:
    assert hub.rate_limited == {"heartbeat": 0, "poll": 0, "result": 0}


# --- heartbeats and the pool ------------------------------------------------------------------


def test_heartbeat_gap_stays_within_interval_plus_one_second_while_every_worker_is_busy(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    interval = 0.5
    services.set_delay("/cohort", 4)
    services.set_delay("/retrieval", 4)
    kit = paced_kit(write_kit, POLL_INTERVAL_SECONDS=str(interval))
    ids = [hub.enqueue("cohort_query", cohort_query(hub))]
    ids += [hub.enqueue("get_imaging_status", imaging_status()) for _ in range(3)]
    started(start_daemon(kit))

    assert wait_until(all_completed(hub, ids), 20)

    handlers = calls_to(services, "/cohort") + calls_to(services, "/retrieval")
    assert len(handlers) == 4
    first_start = min(call.started_at for call in handlers)
    last_end = max(call.finished_at or 0.0 for call in handlers)
    assert last_end - first_start >= 4
    assert wait_until(lambda: hub.heartbeats[-1].at >= last_end, 5)
    beats = [beat.at for beat in hub.heartbeats]
    before = max(at for at in beats if at <= first_start)
    after = min(at for at in beats if at >= last_end)
    during = [at for at in beats if before <= at <= after]
    assert max(gaps(during)) <= interval + 1.0, gaps(during)
    assert len(during) >= 4 / interval
    no_429s(hub)


def test_a_quick_task_claimed_after_a_slow_cohort_query_finishes_first(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    services.set_delay("/cohort", 3)
    started(start_daemon(paced_kit(write_kit)))
    slow = hub.enqueue("cohort_query", cohort_query(hub))
    assert wait_until(lambda: calls_to(services, "/cohort"), 10)

    quick = hub.enqueue("get_imaging_status", imaging_status())

    assert wait_until(lambda: hub.task(quick).status == "COMPLETED", 10)
    assert hub.task(slow).status == "IN_PROGRESS", "the slow query is still running"
    assert wait_until(lambda: hub.task(slow).status == "COMPLETED", 10)
    slow_task, quick_task = hub.task(slow), hub.task(quick)
    assert (quick_task.delivered_at or 0) > (slow_task.delivered_at or 0)
    assert (quick_task.finished_at or 0) < (slow_task.finished_at or 0)
    no_429s(hub)


def test_two_profile_updates_for_one_email_run_in_claim_order_one_at_a_time(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    services.set_delay("/users", 1)
    ids = [
        hub.enqueue("update_user_profile", {"email": "ada@example.org", "enabled": False}),
        hub.enqueue("update_user_profile", {"email": "Ada@Example.org", "enabled": True}),
        hub.enqueue("update_user_profile", {"email": "bob@example.org", "enabled": False}),
    ]
    started(start_daemon(paced_kit(write_kit)))

    assert wait_until(all_completed(hub, ids), 15)

    assert len({hub.task(task_id).delivered_at for task_id in ids}) == 1, "claimed in one poll"
    calls = calls_to(services, "/users")
    ada = [call for call in calls if call.body["email"].lower() == "ada@example.org"]
    [bob] = [call for call in calls if call.body["email"] == "bob@example.org"]
    assert [call.body["enabled"] for call in ada] == [False, True]
    assert (ada[0].finished_at or 0) <= ada[1].started_at, "one at a time"
    assert bob.started_at < (ada[0].finished_at or 0), "another user's update does not wait"


def test_no_poll_while_the_only_worker_is_busy_or_a_claimed_task_waits(
    hub: LoopbackHub, services: LoopbackServices, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    services.set_delay("/retrieval", 1.5)
    ids = [hub.enqueue("get_imaging_status", imaging_status()) for _ in range(2)]
    started(start_daemon(paced_kit(write_kit, MAX_CONCURRENT_TASKS="1")))

    assert wait_until(all_completed(hub, ids), 15)
    assert wait_until(lambda: attempts(hub, POLL, since=hub.task(ids[1]).finished_at or 0), 5)

    claimed_at = hub.task(ids[0]).delivered_at or 0
    assert claimed_at == hub.task(ids[1]).delivered_at, "both came in one poll"
    first, second = calls_to(services, "/retrieval")
    assert (first.finished_at or 0) <= second.started_at, "one worker: one task at a time"
    assert attempts(hub, POLL, since=claimed_at + 1e-6, until=second.finished_at or 0) == []
    assert len(attempts(hub, HEARTBEAT, since=claimed_at, until=second.finished_at or 0)) >= 10


# --- pace -------------------------------------------------------------------------------------


TIGHT = {"heartbeats_per_minute": 10.0, "polls_per_minute": 5.0, "results_per_minute": 20.0}


@pytest.mark.parametrize("hub", [TIGHT], indirect=True)
def test_a_backlog_drains_with_zero_429s_when_every_budget_binds(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    ids = [hub.enqueue("get_imaging_status", imaging_status()) for _ in range(40)]
    started(start_daemon(paced_kit(write_kit, TIGHT)))

    assert wait_until(all_completed(hub, ids), 30)
    time.sleep(1.5)  # idle polls and heartbeats go on against their budgets too

    no_429s(hub)
    posts = sorted(r.at for r in hub.requests_log if r.route.endswith("/result"))
    assert len(posts) == 40
    assert posts[-1] - posts[0] >= MINUTE, "20 per minute held back the other 20"
    for budget, path in ((20, "/result"), (5, POLL), (10, HEARTBEAT)):
        times = sorted(r.at for r in hub.requests_log if r.route.endswith(path))
        windows = zip(times, times[budget:], strict=False)
        assert all(later - first > MINUTE for first, later in windows), path


def test_after_a_429_the_daemon_waits_retry_after_and_warns_of_another_host(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    refused: dict[str, float] = {}

    def refuse_once_each(method: str, path: str, body: bytes) -> RawReply | None:
        route = path.split("?")[0]
        if route not in (HEARTBEAT, POLL) or route in refused:
            return None
        refused[route] = time.monotonic()
        headers = {"Content-Type": "application/json", "Retry-After": "2"}
        return 429, headers, b'{"detail": "Rate limit exceeded"}'

    daemon = started(start_daemon(paced_kit(write_kit)))
    hub.override = refuse_once_each

    assert wait_until(lambda: len(refused) == 2, 5)
    assert wait_until(lambda: attempts(hub, POLL, since=refused[POLL] + 1e-6), 5)
    assert wait_until(lambda: attempts(hub, HEARTBEAT, since=refused[HEARTBEAT] + 1e-6), 5)

    for route, at in refused.items():
        following = attempts(hub, route, since=at + 1e-6)[0]
        assert following - at >= 2.0 - 0.05, route
    assert daemon.wait_for_log("another host may be polling with this kit", 2)
    assert daemon.wait_for_log("no longer rate-limits this key", 5)


def test_a_rejected_key_is_one_error_naming_the_kit_key_and_retries_back_off(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    wrong_key = "revoked-canary-" + uuid.uuid4().hex
    daemon = start_daemon(paced_kit(write_kit, TRUST_API_KEY=wrong_key))

    assert daemon.wait_for_log("TRUST_API_KEY", 5)
    time.sleep(3.5)

    assert daemon.process.poll() is None, "a 401 is retried, not fatal"
    loud = LOUD.findall(daemon.log)
    assert loud == ["ERROR"], daemon.log
    assert wrong_key not in daemon.log
    tries = gaps(attempts(hub, HEARTBEAT))
    assert 3 <= len(tries) <= 6, tries  # at the 0.2 s interval it would be about 18
    assert tries[2] > tries[0]


# --- outages ----------------------------------------------------------------------------------


def ride_out_outage(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon, seconds: float
) -> tuple[Daemon, float, float]:
    """Run idle, cut the hub off (connections reset) for `seconds`, wait for recovery."""
    daemon = started(start_daemon(paced_kit(write_kit)))
    time.sleep(0.5)
    began = time.monotonic()
    hub.set_outage("reset")
    time.sleep(seconds)
    ended = time.monotonic()
    hub.set_outage(None)
    assert daemon.wait_for_log("hub reachable again after", 10), daemon.log
    assert wait_until(lambda: attempts(hub, POLL, since=ended), 10)
    return daemon, began, ended


def test_an_outage_of_many_cycles_logs_two_lines_and_heartbeats_keep_their_interval(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    daemon, began, ended = ride_out_outage(hub, write_kit, start_daemon, 3.0)

    beats = attempts(hub, HEARTBEAT, since=began, until=ended)
    assert len(beats) >= 3.0 / 0.2 - 2, "heartbeats are the probe: they keep the interval"
    assert max(gaps(beats)) <= 0.2 + 0.5
    polls = attempts(hub, POLL, since=began, until=ended)
    assert len(polls) <= 6, "failed polls back off"
    loud = [line for line in daemon.log.splitlines() if LOUD.match(line)]
    assert len(loud) == 2, loud
    assert "hub unreachable since" in loud[0]
    assert "hub reachable again after" in loud[1]


def test_the_first_poll_after_an_outage_comes_within_one_backoff_step(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    _daemon, began, ended = ride_out_outage(hub, write_kit, start_daemon, 3.0)

    failed = attempts(hub, POLL, since=began, until=ended)
    recovered = attempts(hub, POLL, since=ended)[0]
    # After k failures the delay is drawn from [step/2, step], step = interval * 2**k.
    step = 0.2 * 2 ** len(failed)
    assert recovered - failed[-1] <= step + 0.2
    assert recovered - ended <= step


# --- idle -------------------------------------------------------------------------------------


def test_an_idle_cycle_is_two_requests_on_two_kept_alive_connections(
    hub: LoopbackHub, write_kit: KitWriter, start_daemon: StartDaemon
) -> None:
    daemon = started(start_daemon(paced_kit(write_kit)))
    assert wait_until(lambda: len(attempts(hub, POLL)) >= 3, 5)
    connections = hub.connections_opened
    since = time.monotonic()

    time.sleep(5.0)

    window = [r for r in hub.requests_log if r.at >= since]
    polls = [r for r in window if r.route == POLL]
    beats = [r for r in window if r.route == HEARTBEAT]
    assert len(polls) >= 20
    assert len(window) == len(polls) + len(beats), "nothing but heartbeats and polls"
    assert abs(len(beats) - len(polls)) <= 1, (len(beats), len(polls))
    assert hub.connections_opened == connections == 2
    assert len({r.connection for r in polls}) == 1
    assert len({r.connection for r in beats}) == 1
    assert LOUD.findall(daemon.log) == []
