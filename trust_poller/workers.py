"""The worker pool: bounded concurrency, claim order kept where it matters.

Tasks that share an ordering key (one imaging project, one user e-mail) run one at a time
in claim order; at most `cohort_slots` cohort queries run at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    task_id: str
    task_type: str
    keys: tuple[str, ...]
    cohort: bool
    run: Callable[[], None]


class TaskPool:
    def __init__(self, workers: int, cohort_slots: int) -> None:
        self.size = workers
        self.cohort_slots = cohort_slots
        self._queue: list[Job] = []
        self._running: dict[str, Job] = {}
        self._condition = threading.Condition()
        self._accepting = True
        self._closed = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self.size):
            thread = threading.Thread(target=self._work, name=f"worker-{number + 1}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Job) -> None:
        with self._condition:
            self._queue.append(job)
            self._condition.notify_all()

    def holds(self, task_id: str) -> bool:
        with self._condition:
            return task_id in self._running or any(job.task_id == task_id for job in self._queue)

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._queue)

    @property
    def running(self) -> int:
        with self._condition:
            return len(self._running)

    def wait_all_started(self, timeout: float) -> bool:
        """True once no task waits for a worker (so a new claim cannot outrun the pool)."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._queue, timeout)

    def wait_claimable(self, timeout: float) -> bool:
        """True once no task waits and a worker is free: a claim now would start at once."""
        with self._condition:
            return self._condition.wait_for(
                lambda: not self._queue and len(self._running) < self.size, timeout
            )

    def wait_idle(self, timeout: float | None) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: not self._queue and not self._running, timeout)

    def wait_running_done(self, timeout: float) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: not self._running, timeout)

    def stop_starting(self) -> list[Job]:
        """Draining: start nothing more; the queued tasks stay claimed for the next start."""
        with self._condition:
            self._accepting = False
            left, self._queue = self._queue, []
            self._condition.notify_all()
            return left

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _next_job(self) -> Job | None:
        busy = {key for job in self._running.values() for key in job.keys}
        cohorts = sum(job.cohort for job in self._running.values())
        for index, job in enumerate(self._queue):
            if busy.intersection(job.keys) or (job.cohort and cohorts >= self.cohort_slots):
                busy.update(job.keys)  # later tasks with these keys wait their turn
                continue
            return self._queue.pop(index)
        return None

    def _work(self) -> None:
        while True:
            with self._condition:
                job = None
                while not self._closed:
                    job = self._next_job() if self._accepting else None
                    if job is not None:
                        break
                    self._condition.wait()
                if job is None:
                    return
                self._running[job.task_id] = job
                self._condition.notify_all()
            try:
                job.run()
            except Exception:
                log.exception("task %s (%s) crashed its worker", job.task_id, job.task_type)
            finally:
                with self._condition:
                    del self._running[job.task_id]
                    self._condition.notify_all()
