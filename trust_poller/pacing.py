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

from trust_poller.hub_replies import HubError, HubKeyRejected, HubRateLimited
from trust_poller.logs import utc_timestamp

log = logging.getLogger(__name__)

# Budgets count over a window slightly longer than the hub's minute, so clock skew and
# network delay between us and the hub can never tip a request over its limit.
HUB_MINUTE_SECONDS = 60.0
WINDOW_MARGIN_SECONDS = 1.0
WINDOW_SECONDS = HUB_MINUTE_SECONDS + WINDOW_MARGIN_SECONDS
REMIND_EVERY_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 60.0


class Pacer:
    """A sliding-window budget: at most `per_minute` requests in any window, shared by threads."""

    def __init__(
        self,
        name: str,
        per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        minute: float = HUB_MINUTE_SECONDS,
    ) -> None:
        self.name = name
        self.limit = max(1, int(per_minute))
        self.window = (minute + WINDOW_MARGIN_SECONDS) * self.limit / per_minute
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

    @property
    def spacing(self) -> float:
        """The steady gap between requests that the budget sustains without ever waiting."""
        return self.window / self.limit

    def wait_seconds(self) -> float:
        """How long until a turn is free (0: now), without taking it."""
        with self._lock:
            return self._delay(self._clock())

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
        self,
        heartbeats_per_minute: float,
        polls_per_minute: float,
        results_per_minute: float,
        *,
        minute: float = HUB_MINUTE_SECONDS,
    ) -> None:
        self.heartbeats = Pacer("heartbeat", heartbeats_per_minute, minute=minute)
        self.polls = Pacer("poll", polls_per_minute, minute=minute)
        self.results = Pacer("result", results_per_minute, minute=minute)


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
    so a 5-minute outage costs two lines, not one per failed request. Each thread reports
    on its own `channel`: the problem ends when every channel that failed has succeeded
    again, so working heartbeats do not hide result posts that still fail.
    """

    def __init__(self, subject: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.subject = subject
        self._clock = clock
        self._failing: set[str] = set()
        self._since: float | None = None
        self._since_wall = 0.0
        self._reminded = 0.0
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, reason: str, level: int = logging.WARNING, channel: str = "") -> None:
        with self._lock:
            now = self._clock()
            self._failing.add(channel)
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

    def recovered(self, message: str, channel: str = "") -> None:
        with self._lock:
            if self._since is None or channel not in self._failing:
                return
            self._failing.discard(channel)
            if self._failing:
                return
            lasted = self._clock() - self._since
            self._since = None
        log.warning("%s after %.0f s", message, lasted)


class HubTrouble:
    """The hub's condition as every thread sees it, logged once per problem, not per request.

    `channel` names the caller ("heartbeat", "poll"; the rest share "other").
    """

    def __init__(self) -> None:
        self.unreachable = ProblemLog("hub unreachable")
        self.key_rejected = ProblemLog("hub rejects this kit's API key")
        self.rate_limited = ProblemLog("hub rate-limits this key")

    def failed(
        self,
        reason: str,
        *,
        key_rejected: bool = False,
        rate_limited: bool = False,
        channel: str = "other",
    ) -> None:
        if key_rejected:
            self.key_rejected.failed(
                f"{reason} — the kit's TRUST_API_KEY is the likely cause", logging.ERROR, channel
            )
        elif rate_limited:
            self.rate_limited.failed(reason, logging.WARNING, channel)
        else:
            self.unreachable.failed(reason, logging.WARNING, channel)

    def failed_call(self, exc: HubError | HubKeyRejected, channel: str = "other") -> None:
        """One failed hub call, filed under the problem its exception names."""
        if isinstance(exc, HubKeyRejected):
            self.failed(str(exc), key_rejected=True, channel=channel)
        elif isinstance(exc, HubRateLimited):
            self.failed(exc.reason, rate_limited=True, channel=channel)
        else:
            self.failed(exc.reason, channel=channel)

    def succeeded(self, channel: str = "other") -> None:
        self.unreachable.recovered("hub reachable again", channel)
        self.key_rejected.recovered("hub accepts this kit's API key again", channel)
        self.rate_limited.recovered("hub no longer rate-limits this key", channel)

    @property
    def state(self) -> str:
        if self.key_rejected.failing:
            return "key rejected"
        if self.unreachable.failing:
            return "unreachable"
        if self.rate_limited.failing:
            return "rate-limited"
        return "ok"
