"""A fake monotonic clock for tests of pacing: waits pass on it instead of in real time."""

from __future__ import annotations

import threading


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ClockHalt(threading.Event):
    """A halt event whose waits pass on the fake clock instead of in real time."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            raise ValueError("ClockHalt waits need a timeout")
        self.waits.append(timeout)
        self.clock.now += timeout
        return self.is_set()
