"""How fast trust-poller talks to the hub: per-minute budgets, backoff, and problem logging.

Every duration here uses the monotonic clock, and every wait is on an Event, so a signal
ends it at once and a wall-clock jump changes nothing.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable

from trust_poller.logs import utc_timestamp

log = logging.getLogger(__name__)

# Budgets count over a window slightly longer than the hub's minute, so clock skew and
# network delay between us and the hub can never tip a request over its limit.
WINDOW_SECONDS = 61.0
REMIND_EVERY_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 60.0


class Pacer:
    """A sliding-window budget: at most `per_minute` requests in any window, shared by threads."""

    def __init__(
        self, name: str, per_minute: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.limit = max(1, int(per_minute))
        self.window = WINDOW_SECONDS * self.limit / per_minute
        self._clock = clock
        self._sent: collections.deque[float] = collections.deque()
        self._not_before = 0.0
        self._lock = threading.Lock()

    def _delay(self, now: float) -> float:
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        delay = max(0.0, self._not_before - now)
        if len(self._sent) >= self.limit:
            delay = max(delay, self._sent[0] + self.window - now)
        return delay

    def acquire(self, halt: threading.Event) -> bool:
        """Wait for a turn; take it and return True, or return False when `halt` is set."""
        while not halt.is_set():
            with self._lock:
                now = self._clock()
                delay = self._delay(now)
                if delay <= 0:
                    self._sent.append(now)
                    return True
            halt.wait(delay)
        return False

    def charge(self) -> None:
        """Count a request made without waiting (the bodyless resend after a 422)."""
        with self._lock:
            self._sent.append(self._clock())

    def defer(self, seconds: float) -> None:
        """The hub said 429: nothing more until `seconds` have passed."""
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + seconds)


class HubBudgets:
    """The three per-key budgets the hub enforces, shared by every thread."""

    def __init__(
        self, heartbeats_per_minute: float, polls_per_minute: float, results_per_minute: float
    ) -> None:
        self.heartbeats = Pacer("heartbeat", heartbeats_per_minute)
        self.polls = Pacer("poll", polls_per_minute)
        self.results = Pacer("result", results_per_minute)


class Backoff:
    """Jittered exponential delays from `base` up to 60 s; `reset()` on the first success."""

    def __init__(self, base: float, maximum: float = MAX_BACKOFF_SECONDS) -> None:
        self.base = base
        self.maximum = max(base, maximum)
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.maximum, self.base * 2 ** min(self.failures, 16))
        return random.uniform(max(self.base, ceiling / 2), ceiling)  # noqa: S311 - jitter, not crypto

    def reset(self) -> None:
        self.failures = 0


class ProblemLog:
    """Logs a problem when it starts, reminds at most every 10 minutes, and logs its end.

    One instance per kind of trouble (e.g. "hub"), shared by every thread that meets it,
    so a 5-minute outage costs two lines, not one per failed request.
    """

    def __init__(self, subject: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.subject = subject
        self._clock = clock
        self._since: float | None = None
        self._since_wall = 0.0
        self._reminded = 0.0
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, reason: str, level: int = logging.WARNING) -> None:
        with self._lock:
            now = self._clock()
            if self._since is None:
                self._since, self._since_wall, self._reminded = now, time.time(), now
                log.log(
                    level, "%s since %s: %s", self.subject, utc_timestamp(self._since_wall), reason
                )
            elif now - self._reminded >= REMIND_EVERY_SECONDS:
                self._reminded = now
                log.log(
                    level,
                    "%s still, since %s (%.0f min): %s",
                    self.subject,
                    utc_timestamp(self._since_wall),
                    (now - self._since) / 60,
                    reason,
                )
            else:
                log.debug("%s: %s", self.subject, reason)

    def recovered(self, message: str) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted = self._clock() - self._since
            self._since = None
        log.warning("%s after %.0f s", message, lasted)


class HubTrouble:
    """The hub's condition as every thread sees it, logged once per problem, not per request."""

    def __init__(self) -> None:
        self.unreachable = ProblemLog("hub unreachable")
        self.key_rejected = ProblemLog("hub rejects this kit's API key")
        self.rate_limited = ProblemLog("hub rate-limits this key")

    def failed(
        self, reason: str, *, key_rejected: bool = False, rate_limited: bool = False
    ) -> None:
        if key_rejected:
            self.key_rejected.failed(
                f"{reason} — the kit's TRUST_API_KEY is the likely cause", logging.ERROR
            )
        elif rate_limited:
            self.rate_limited.failed(reason)
        else:
            self.unreachable.failed(reason)

    def succeeded(self) -> None:
        self.unreachable.recovered("hub reachable again")
        self.key_rejected.recovered("hub accepts this kit's API key again")
        self.rate_limited.recovered("hub no longer rate-limits this key")

    @property
    def state(self) -> str:
        if self.key_rejected.failing:
            return "key rejected"
        if self.unreachable.failing:
            return "unreachable"
        if self.rate_limited.failing:
            return "rate-limited"
        return "ok"
