"""The worker pool: bounded concurrency, claim order per key, cohort slots, and draining."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from trust_poller.workers import Job, TaskPool

PATIENCE = 2.0  # seconds a test waits for something that should happen at once


class Recorder:
    """Jobs whose runs are gated by Events; records starts, ends and peak concurrency."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.running: set[str] = set()
        self.peak = 0
        self.gates: dict[str, threading.Event] = {}
        self.changed = threading.Condition(self.lock)

    def job(
        self,
        task_id: str,
        *,
        keys: tuple[str, ...] = (),
        cohort: bool = False,
        blocked: bool = True,
        task_type: str = "delete_imaging",
    ) -> Job:
        gate = threading.Event()
        if not blocked:
            gate.set()
        self.gates[task_id] = gate

        def run() -> None:
            with self.lock:
                self.started.append(task_id)
                self.running.add(task_id)
                self.peak = max(self.peak, len(self.running))
                self.changed.notify_all()
            gate.wait(PATIENCE * 2)
            with self.lock:
                self.running.discard(task_id)
                self.finished.append(task_id)
                self.changed.notify_all()

        return Job(task_id, task_type, keys, cohort, run)

    def release(self, task_id: str) -> None:
        self.gates[task_id].set()

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def wait_for(self, predicate: Callable[[], bool]) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, PATIENCE)

    def wait_started(self, *task_ids: str) -> bool:
        return self.wait_for(lambda: all(t in self.started for t in task_ids))

    def wait_finished(self, *task_ids: str) -> bool:
        return self.wait_for(lambda: all(t in self.finished for t in task_ids))

    def settle(self) -> None:
        """Give idle workers a moment to (wrongly) pick something up."""
        time.sleep(0.1)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    jobs = Recorder()
    yield jobs
    jobs.release_all()


@pytest.fixture
def make_pool(recorder: Recorder) -> Iterator[Callable[[int, int], TaskPool]]:
    pools: list[TaskPool] = []

    def make(workers: int, cohort_slots: int = 1) -> TaskPool:
        pool = TaskPool(workers, cohort_slots)
        pool.start()
        pools.append(pool)
        return pool

    yield make
    recorder.release_all()
    for pool in pools:
        pool.close()


def test_never_more_than_n_tasks_run_at_once(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(2, 1)
    for number in range(6):
        pool.submit(recorder.job(f"t{number}"))
    assert recorder.wait_started("t0", "t1")
    recorder.settle()
    assert pool.running == 2
    assert pool.waiting == 4
    assert len(recorder.started) == 2
    recorder.release_all()
    assert pool.wait_idle(PATIENCE)
    assert sorted(recorder.finished) == [f"t{n}" for n in range(6)]
    assert recorder.peak == 2


def test_a_slow_task_does_not_block_a_quick_one_submitted_after_it(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(2, 1)
    pool.submit(recorder.job("slow"))
    pool.submit(recorder.job("quick", blocked=False))
    assert recorder.wait_finished("quick")
    assert "slow" not in recorder.finished
    assert pool.running == 1


def test_same_key_runs_one_at_a_time_in_claim_order(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(3, 1)
    for task_id in ("first", "second", "third"):
        pool.submit(recorder.job(task_id, keys=("imaging:p1",)))
    assert recorder.wait_started("first")
    recorder.settle()
    assert recorder.started == ["first"]
    recorder.release("first")
    assert recorder.wait_started("second")
    recorder.settle()
    assert recorder.started == ["first", "second"]
    recorder.release("second")
    recorder.release("third")
    assert pool.wait_idle(PATIENCE)
    assert recorder.started == ["first", "second", "third"]
    assert recorder.peak == 1


def test_different_keys_run_side_by_side(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(3, 1)
    pool.submit(recorder.job("a1", keys=("imaging:a",)))
    pool.submit(recorder.job("a2", keys=("imaging:a",)))
    pool.submit(recorder.job("b1", keys=("imaging:b",)))
    assert recorder.wait_started("a1", "b1")
    recorder.settle()
    assert "a2" not in recorder.started


def test_only_cohort_slots_cohort_queries_run_while_other_tasks_proceed(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(3, 1)
    pool.submit(recorder.job("cohort-1", cohort=True, task_type="cohort_query"))
    pool.submit(recorder.job("cohort-2", cohort=True, task_type="cohort_query"))
    pool.submit(recorder.job("other", blocked=False))
    assert recorder.wait_finished("other")
    assert "cohort-1" in recorder.started
    assert "cohort-2" not in recorder.started
    recorder.release("cohort-1")
    assert recorder.wait_started("cohort-2")
    assert recorder.peak <= 2


def test_two_cohort_slots_allow_two_cohort_queries(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(4, 2)
    for number in range(3):
        pool.submit(recorder.job(f"cohort-{number}", cohort=True))
    assert recorder.wait_started("cohort-0", "cohort-1")
    recorder.settle()
    assert "cohort-2" not in recorder.started


def test_a_blocked_task_keeps_later_tasks_with_its_key_behind_it(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(3, 1)
    pool.submit(recorder.job("cohort-running", cohort=True))
    pool.submit(recorder.job("cohort-waiting", keys=("project:p",), cohort=True))
    pool.submit(recorder.job("same-key-later", keys=("project:p",)))
    pool.submit(recorder.job("free", blocked=False))
    assert recorder.wait_finished("free")
    recorder.settle()
    assert "same-key-later" not in recorder.started
    recorder.release("cohort-running")
    assert recorder.wait_started("cohort-waiting")
    recorder.settle()
    assert "same-key-later" not in recorder.started
    recorder.release("cohort-waiting")
    assert recorder.wait_started("same-key-later")
    assert recorder.started.index("cohort-waiting") < recorder.started.index("same-key-later")


def test_stop_starting_returns_queued_jobs_and_lets_running_ones_finish(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(1, 1)
    pool.submit(recorder.job("running"))
    pool.submit(recorder.job("queued-1", blocked=False))
    pool.submit(recorder.job("queued-2", blocked=False))
    assert recorder.wait_started("running")
    left = pool.stop_starting()
    assert [job.task_id for job in left] == ["queued-1", "queued-2"]
    assert pool.waiting == 0
    assert pool.holds("running")
    assert not pool.holds("queued-1")
    recorder.release("running")
    assert pool.wait_running_done(PATIENCE)
    pool.submit(recorder.job("after-stop", blocked=False))
    recorder.settle()
    assert recorder.started == ["running"]
    assert recorder.finished == ["running"]


def test_wait_all_started_is_true_once_nothing_waits_for_a_worker(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(1, 1)
    pool.submit(recorder.job("first"))
    pool.submit(recorder.job("second"))
    assert recorder.wait_started("first")
    assert pool.wait_all_started(0.1) is False
    recorder.release("first")
    assert pool.wait_all_started(PATIENCE) is True
    assert pool.running == 1
    assert pool.wait_idle(0.1) is False
    recorder.release("second")
    assert pool.wait_idle(PATIENCE) is True
    assert pool.running == 0
    assert pool.waiting == 0


def test_holds_tracks_a_task_until_it_finishes(
    recorder: Recorder, make_pool: Callable[[int, int], TaskPool]
) -> None:
    pool = make_pool(1, 1)
    pool.submit(recorder.job("running"))
    pool.submit(recorder.job("queued"))
    assert recorder.wait_started("running")
    assert pool.holds("running")
    assert pool.holds("queued")
    assert not pool.holds("unknown")
    recorder.release_all()
    assert pool.wait_idle(PATIENCE)
    assert not pool.holds("running")
    assert not pool.holds("queued")


def test_a_crashing_job_does_not_kill_its_worker(
    recorder: Recorder,
    make_pool: Callable[[int, int], TaskPool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(1, 1)

    def crash() -> None:
        raise RuntimeError("handler bug")

    pool.submit(Job("crasher", "create_imaging", ("imaging:p",), False, crash))
    pool.submit(recorder.job("next-same-key", keys=("imaging:p",), blocked=False))
    assert recorder.wait_finished("next-same-key")
    assert pool.wait_idle(PATIENCE)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "crasher" in record.getMessage()
    assert record.exc_info is not None


def test_jobs_submitted_before_start_run_once_started(recorder: Recorder) -> None:
    pool = TaskPool(2, 1)
    pool.submit(recorder.job("early", blocked=False))
    recorder.settle()
    assert recorder.started == []
    pool.start()
    try:
        assert recorder.wait_finished("early")
    finally:
        pool.close()
