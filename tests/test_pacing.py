"""Pacing: per-minute budgets, backoff delays, and problem logging that does not flood."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from trust_poller.pacing import (
    MAX_BACKOFF_SECONDS,
    REMIND_EVERY_SECONDS,
    WINDOW_SECONDS,
    Backoff,
    HubTrouble,
    Pacer,
    ProblemLog,
)
from trust_poller.playground.fake_clock import ClockHalt, FakeClock


def _grants(pacer: Pacer, halt: ClockHalt, count: int) -> list[float]:
    granted = []
    for _ in range(count):
        assert pacer.acquire(halt)
        granted.append(halt.clock.now)
    return granted


# --- Pacer -------------------------------------------------------------------------------------


def test_acquire_within_budget_does_not_wait() -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    _grants(Pacer("poll", 30, clock), halt, 30)
    assert halt.waits == []
    assert clock.now == 1000.0


@pytest.mark.parametrize(("per_minute", "limit"), [(30, 30), (60, 60), (5, 5)])
def test_never_more_than_the_limit_in_any_window(per_minute: float, limit: int) -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    granted = _grants(Pacer("result", per_minute, clock), halt, limit * 4)
    for first, later in zip(granted, granted[limit:], strict=False):
        assert later - first >= WINDOW_SECONDS
    assert halt.waits, "a full window must make acquire wait"


def test_the_next_turn_comes_as_soon_as_the_oldest_leaves_the_window() -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    pacer = Pacer("heartbeat", 2, clock)
    assert pacer.acquire(halt)
    clock.now += 10
    assert pacer.acquire(halt)
    assert pacer.acquire(halt)
    assert clock.now == pytest.approx(1000.0 + WINDOW_SECONDS)
    assert sum(halt.waits) == pytest.approx(WINDOW_SECONDS - 10)


def test_fractional_rate_spreads_turns_over_a_longer_window() -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    granted = _grants(Pacer("slow", 0.5, clock), halt, 3)
    assert granted[1] - granted[0] >= 2 * WINDOW_SECONDS
    assert granted[2] - granted[1] >= 2 * WINDOW_SECONDS


def test_acquire_returns_false_at_once_when_halt_is_set_and_takes_no_turn() -> None:
    pacer = Pacer("poll", 1)
    halt = threading.Event()
    halt.set()
    started = time.monotonic()
    assert pacer.acquire(halt) is False
    assert time.monotonic() - started < 0.1
    assert pacer.acquire(threading.Event()) is True


def test_halt_ends_a_wait_for_a_turn() -> None:
    pacer = Pacer("poll", 1)
    halt = threading.Event()
    assert pacer.acquire(halt)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(pacer.acquire(halt)))
    waiter.start()
    time.sleep(0.05)
    assert outcome == [], "the second turn must wait for the window"
    halt.set()
    waiter.join(timeout=1.0)
    assert outcome == [False]


def test_defer_blocks_until_its_time() -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    pacer = Pacer("poll", 30, clock)
    pacer.defer(10)
    pacer.defer(2)  # a shorter deferral never shortens an earlier one
    assert pacer.acquire(halt)
    assert clock.now == pytest.approx(1010.0)


def test_defer_in_the_past_changes_nothing() -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    pacer = Pacer("poll", 30, clock)
    pacer.defer(5)
    clock.now += 6
    assert pacer.acquire(halt)
    assert halt.waits == []


def test_charge_counts_against_the_budget() -> None:
    clock = FakeClock()
    halt = ClockHalt(clock)
    pacer = Pacer("heartbeat", 2, clock)
    pacer.charge()
    assert pacer.acquire(halt)
    assert halt.waits == []
    clock.now += 1
    assert pacer.acquire(halt)
    assert clock.now == pytest.approx(1000.0 + WINDOW_SECONDS)


def test_pacer_is_shared_safely_between_threads() -> None:
    pacer = Pacer("result", 20)
    halt = threading.Event()
    granted: list[bool] = []
    lock = threading.Lock()

    def take() -> None:
        result = pacer.acquire(halt)
        with lock:
            granted.append(result)

    threads = [threading.Thread(target=take) for _ in range(25)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    with lock:
        assert granted.count(True) == 20
    halt.set()
    for thread in threads:
        thread.join(timeout=1.0)
    assert granted.count(True) == 20
    assert granted.count(False) == 5


# --- Backoff -----------------------------------------------------------------------------------


def test_backoff_delays_stay_between_base_and_sixty_seconds() -> None:
    backoff = Backoff(2.0)
    delays = [backoff.next_delay() for _ in range(40)]
    assert all(2.0 <= delay <= MAX_BACKOFF_SECONDS for delay in delays)
    assert max(delays) > MAX_BACKOFF_SECONDS / 2


def test_backoff_grows_with_failures() -> None:
    backoff = Backoff(1.0)
    delays = [backoff.next_delay() for _ in range(5)]
    assert delays[0] <= 2.0
    assert 8.0 <= delays[3] <= 16.0
    assert delays[4] >= 16.0
    assert delays[4] > delays[0]


def test_backoff_reset_restores_the_base_delay() -> None:
    backoff = Backoff(1.5)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert 1.5 <= backoff.next_delay() <= 3.0


def test_backoff_base_above_the_maximum_is_kept() -> None:
    assert Backoff(90.0).next_delay() == 90.0


# --- ProblemLog --------------------------------------------------------------------------------


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="trust_poller.pacing")
    return caplog


def test_first_failure_logs_a_warning_with_since(caplog_debug: pytest.LogCaptureFixture) -> None:
    problems = ProblemLog("hub unreachable", FakeClock())
    problems.failed("connection refused")
    assert problems.failing
    [line] = _loud(caplog_debug)
    assert line.startswith("hub unreachable since ")
    assert line.endswith(": connection refused")
    assert caplog_debug.records[0].levelno == logging.WARNING


def test_repeated_failures_within_ten_minutes_are_quiet(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    problems = ProblemLog("hub unreachable", clock)
    problems.failed("connection refused")
    for _ in range(10):
        clock.now += 30
        problems.failed("connection refused")
    assert len(_loud(caplog_debug)) == 1
    debug = [r for r in caplog_debug.records if r.levelno == logging.DEBUG]
    assert len(debug) == 10


def test_a_reminder_comes_after_ten_minutes(caplog_debug: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    problems = ProblemLog("hub unreachable", clock)
    problems.failed("connection refused")
    clock.now += REMIND_EVERY_SECONDS - 1
    problems.failed("connection refused")
    assert len(_loud(caplog_debug)) == 1
    clock.now += 1
    problems.failed("timed out")
    loud = _loud(caplog_debug)
    assert len(loud) == 2
    assert "still" in loud[1]
    assert "(10 min)" in loud[1]
    assert loud[1].endswith(": timed out")


def test_recovery_logs_once_with_its_duration(caplog_debug: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    problems = ProblemLog("hub unreachable", clock)
    problems.recovered("hub reachable again")
    assert _loud(caplog_debug) == []
    problems.failed("connection refused")
    clock.now += 125
    problems.recovered("hub reachable again")
    problems.recovered("hub reachable again")
    assert not problems.failing
    assert _loud(caplog_debug)[1:] == ["hub reachable again after 125 s"]


def test_five_minutes_of_failures_every_five_seconds_cost_at_most_three_lines(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    problems = ProblemLog("hub unreachable", clock)
    for _ in range(60):
        problems.failed("connection refused")
        clock.now += 5
    problems.recovered("hub reachable again")
    assert len(_loud(caplog_debug)) <= 3
    assert _loud(caplog_debug)[-1] == "hub reachable again after 300 s"


def test_a_new_problem_after_recovery_is_logged_again(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    problems = ProblemLog("hub unreachable", clock)
    problems.failed("refused")
    problems.recovered("back")
    clock.now += 1
    problems.failed("refused again")
    assert _loud(caplog_debug)[-1].endswith(": refused again")


# --- HubTrouble --------------------------------------------------------------------------------


def test_hub_trouble_state_names_the_worst_current_problem(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trouble = HubTrouble()
    assert trouble.state == "ok"
    trouble.failed("429", rate_limited=True)
    assert trouble.state == "rate-limited"
    trouble.failed("connection refused")
    assert trouble.state == "unreachable"
    trouble.failed("401", key_rejected=True)
    assert trouble.state == "key rejected"
    trouble.succeeded()
    assert trouble.state == "ok"


def test_hub_trouble_key_rejection_is_an_error_naming_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trust_poller.pacing")
    trouble = HubTrouble()
    trouble.failed("heartbeat: 401", key_rejected=True)
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.ERROR
    assert "TRUST_API_KEY" in record.getMessage()


def test_a_failed_call_is_filed_under_the_problem_its_exception_names() -> None:
    from trust_poller.hub import HubError, HubKeyRejected, HubRateLimited

    trouble = HubTrouble()
    trouble.failed_call(HubRateLimited("poll: 429", status=429, retry_after=5))
    assert trouble.state == "rate-limited"
    trouble.failed_call(HubError("poll: connection refused"))
    assert trouble.state == "unreachable"
    trouble.failed_call(HubKeyRejected("poll: 401"))
    assert trouble.state == "key rejected"
    trouble.succeeded()
    assert trouble.state == "ok"
