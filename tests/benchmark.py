"""Benchmark: idle cost, task latency, drain at the hub's limits, heartbeats under a long handler.

Drives the real CLI (`python -m trust_poller run`, a child process) against the loopback hub
and loopback trust services, and prints the figures of issue 4 against their targets. It is
a script, not a test (pytest does not collect it):

    .venv/bin/python tests/benchmark.py            # about six minutes
    .venv/bin/python tests/benchmark.py --quick    # a smoke run of about a minute

The drain is bound by the hub's result limit (200 results at 60 per minute), so the full run
cannot be much shorter; the other measurements run beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trust_poller import crypto
from trust_poller.playground.harness import Daemon, cli_env, wait_until
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.loopback_services import LoopbackServices

INTERNAL_KEY = "benchmark-internal-key-7Hq2xZ"
HEARTBEAT, POLL = "/api/trust/heartbeat", "/api/tasks/pending"
# The hub's published per-key limits: heartbeats, polls and result posts per minute.
HEARTBEATS_PER_MINUTE, POLLS_PER_MINUTE, RESULTS_PER_MINUTE = 30.0, 30.0, 60.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Scale:
    name: str
    minute: float  # the hub's rate-limit window (60 s: the real one)
    idle_interval: float
    idle_cycles: int
    fast_interval: float
    fast_cycles: int
    latency_interval: float
    latency_tasks: int
    latency_spread: float
    drain_tasks: int
    handler_seconds: float
    gap_interval: float


FULL = Scale("full", 60.0, 5.0, 20, 0.5, 100, 5.0, 20, 60.0, 200, 60.0, 5.0)
QUICK = Scale("quick", 6.0, 1.0, 10, 0.2, 100, 1.0, 10, 10.0, 200, 10.0, 1.0)


# --- one daemon against its own loopback hub --------------------------------------------------


@dataclass
class Lab:
    hub: LoopbackHub
    services: LoopbackServices
    daemon: Daemon

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process (all its threads), from /proc/<pid>/stat."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss(self) -> int:
        """VmHWM of the daemon process, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")

    def times(self, route: str, since: float = 0.0) -> list[float]:
        return [r.at for r in self.hub.requests_log if r.route == route and r.at >= since]


@contextlib.contextmanager
def lab(scale: Scale, interval: float, limited: bool = True, **kit: str) -> Iterator[Lab]:
    """A hub (enforcing the real limits over the scale's minute), services, and a daemon."""
    with (
        tempfile.TemporaryDirectory(prefix="trust-poller-bench-") as scratch,
        LoopbackHub(
            trust_name="Bench Trust",
            heartbeats_per_minute=HEARTBEATS_PER_MINUTE if limited else None,
            polls_per_minute=POLLS_PER_MINUTE if limited else None,
            results_per_minute=RESULTS_PER_MINUTE if limited else None,
            rate_window=scale.minute,
        ) as hub,
        LoopbackServices(
            internal_key=INTERNAL_KEY, admin_key=crypto.cohort_admin_key(hub.aes_key_base64)
        ) as services,
    ):
        values = {
            **hub.kit_values(),
            "TRUST_INTERNAL_SERVICE_KEY": INTERNAL_KEY,
            "DATA_ACCESS_API_URL": services.url,
            "IMAGING_API_URL": services.url,
            "XNAT_URL": services.url,
            "OMOP_DB_HOST": "127.0.0.1",
            "OMOP_DB_PORT": str(services.port),
            "POLL_INTERVAL_SECONDS": f"{interval:g}",
            **kit,
        }
        if scale.minute != 60.0:
            values["HUB_RATE_WINDOW_SECONDS"] = f"{scale.minute:g}"
        kit_path = Path(scratch) / "kit.env"
        kit_path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        kit_path.chmod(0o600)
        args = ["run", "--kit", str(kit_path), "--state-dir", str(Path(scratch) / "state")]
        daemon = Daemon(args, Path(scratch) / "daemon.log", cli_env())
        try:
            if not daemon.wait_for_log("authenticated to hub as trust", 30):
                raise RuntimeError(f"the daemon did not start:\n{daemon.log}")
            yield Lab(hub, services, daemon)
        finally:
            daemon.stop()


def imaging_status() -> dict[str, str]:
    return {"imaging_project_id": str(uuid.uuid4()), "encoded_query": "cT0x"}


def all_completed(hub: LoopbackHub, ids: list[str]) -> bool:
    return all(hub.task(task_id).status == "COMPLETED" for task_id in ids)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    if not wait_until(predicate, timeout, step=0.1):
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the measurements -------------------------------------------------------------------------


def idle_cost(scale: Scale) -> dict[str, float]:
    """Requests, CPU and memory over idle cycles at the default interval and the real limits."""
    with lab(scale, scale.idle_interval) as bench:
        wait_for(lambda: bench.times(POLL), 30, "the first poll")
        first = bench.times(POLL)[-1]
        cpu = bench.cpu_seconds()
        wait_for(lambda: len(bench.times(POLL, first)) > scale.idle_cycles, 30 + 3 * 60, "polls")
        last = bench.times(POLL, first)[scale.idle_cycles]
        cpu = bench.cpu_seconds() - cpu
        window = [r for r in bench.hub.requests_log if first < r.at <= last]
        return {
            "requests_per_cycle": len(window) / scale.idle_cycles,
            "cpu_ms_per_cycle": 1000 * cpu / scale.idle_cycles,
            "peak_rss": bench.peak_rss(),
            "rate_limited": sum(bench.hub.rate_limited.values()),
        }


def connection_reuse(scale: Scale) -> dict[str, float]:
    """New TCP connections over 100 idle cycles after the first (short interval, no limits)."""
    budgets = {f"HUB_{kind}_PER_MINUTE": "6000" for kind in ("HEARTBEATS", "POLLS", "RESULTS")}
    with lab(scale, scale.fast_interval, limited=False, **budgets) as bench:
        wait_for(lambda: bench.times(POLL), 30, "the first poll")
        opened = bench.hub.connections_opened
        first = bench.times(POLL)[-1]
        cpu = bench.cpu_seconds()
        wait_for(lambda: len(bench.times(POLL, first)) > scale.fast_cycles, 60, "polls")
        cpu = bench.cpu_seconds() - cpu
        last = bench.times(POLL, first)[scale.fast_cycles]
        window = [r for r in bench.hub.requests_log if first < r.at <= last]
        return {
            "connections_at_first_cycle": opened,
            "new_connections_per_100": (bench.hub.connections_opened - opened)
            * 100
            / scale.fast_cycles,
            "requests_per_cycle": len(window) / scale.fast_cycles,
            "cpu_ms_per_cycle": 1000 * cpu / scale.fast_cycles,
        }


def task_latency(scale: Scale) -> dict[str, float]:
    """Hub enqueue → result recorded, for quick tasks enqueued at random times."""
    rng = random.Random(4)
    offsets = sorted(rng.uniform(0, scale.latency_spread) for _ in range(scale.latency_tasks))
    with lab(scale, scale.latency_interval) as bench:
        began = time.monotonic()
        ids = []
        for offset in offsets:
            time.sleep(max(0.0, began + offset - time.monotonic()))
            ids.append(bench.hub.enqueue("get_imaging_status", imaging_status()))
        wait_for(lambda: all_completed(bench.hub, ids), 60, "every latency task")
        latencies = []
        for task_id in ids:
            task = bench.hub.task(task_id)
            latencies.append((task.finished_at or 0.0) - task.enqueued_at)
        return {
            "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95),
            "max": max(latencies),
            "rate_limited": sum(bench.hub.rate_limited.values()),
            "peak_rss": bench.peak_rss(),
        }


def drain(scale: Scale) -> dict[str, float]:
    """Quick tasks at the hub's real limits, enqueued at once while the daemon idles."""
    minimum = scale.drain_tasks / RESULTS_PER_MINUTE * scale.minute
    with lab(scale, scale.idle_interval) as bench:
        kinds = ("get_imaging_status", "delete_imaging")
        began = time.monotonic()
        ids = [
            bench.hub.enqueue(
                kinds[n % 2],
                imaging_status() if n % 2 == 0 else {"imaging_project_id": str(uuid.uuid4())},
            )
            for n in range(scale.drain_tasks)
        ]
        wait_for(lambda: all_completed(bench.hub, ids), 3 * minimum + 60, "the drain")
        finished = max(bench.hub.task(task_id).finished_at or 0.0 for task_id in ids)
        return {
            "seconds": finished - began,
            "minimum": minimum,
            "rate_limited": sum(bench.hub.rate_limited.values()),
            "polls": len(bench.times(POLL, began)),
            "peak_rss": bench.peak_rss(),
        }


def heartbeat_gap(scale: Scale) -> dict[str, float]:
    """The largest gap between heartbeats the hub recorded while one long handler ran."""
    with lab(scale, scale.gap_interval) as bench:
        bench.services.set_delay("/cohort", scale.handler_seconds)
        task_id = bench.hub.enqueue(
            "cohort_query",
            {
                "encrypted_project_id": "sealed",
                "query_id": str(uuid.uuid4()),
                "query_name": "a long one",
                "query": "SELECT 1",
                "trust_id": bench.hub.trust_id,
            },
        )
        limit = scale.handler_seconds + 60
        wait_for(lambda: bench.hub.task(task_id).status == "COMPLETED", limit, "the long task")
        [call] = [c for c in bench.services.calls if c.path == "/cohort"]
        ended = call.finished_at or time.monotonic()
        wait_for(lambda: bench.hub.heartbeats[-1].at > ended, 30, "a heartbeat after it")
        beats = [beat.at for beat in bench.hub.heartbeats]
        before = max([at for at in beats if at <= call.started_at], default=beats[0])
        after = min(at for at in beats if at >= ended)
        spanning = [at for at in beats if before <= at <= after]
        gaps = [later - earlier for earlier, later in itertools.pairwise(spanning)]
        return {
            "handler": ended - call.started_at,
            "largest_gap": max(gaps),
            "heartbeats": len(spanning),
            "interval": scale.gap_interval,
            "rate_limited": sum(bench.hub.rate_limited.values()),
        }


# --- running and printing ---------------------------------------------------------------------


def in_parallel(jobs: dict[str, Callable[[], dict[str, float]]]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, job: Callable[[], dict[str, float]]) -> None:
        try:
            results[name] = job()
        except BaseException as exc:  # noqa: BLE001 - reported below, per measurement
            errors[name] = exc

    threads = [threading.Thread(target=run, args=item, name=item[0]) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("; ".join(f"{name}: {exc}" for name, exc in errors.items()))
    return results


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def line(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<46} {value:<14} {note}".rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a scaled-down smoke run")
    scale = QUICK if parser.parse_args().quick else FULL
    started = time.monotonic()
    print(
        f"trust-poller benchmark ({scale.name}): the real CLI against the loopback hub; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    if scale.minute != 60.0:
        print(f"  (quick: the hub's minute is {scale.minute:g} s on both sides; figures scale)")
    sys.stdout.flush()

    idle = idle_cost(scale)
    reuse = connection_reuse(scale)
    rest = in_parallel(
        {
            "drain": lambda: drain(scale),
            "latency": lambda: task_latency(scale),
            "gap": lambda: heartbeat_gap(scale),
        }
    )
    drained, latency, gap = rest["drain"], rest["latency"], rest["gap"]
    peak = max(idle["peak_rss"], latency["peak_rss"], drained["peak_rss"])

    print(f"\nidle at POLL_INTERVAL_SECONDS={scale.idle_interval:g}, {scale.idle_cycles} cycles")
    line(
        "hub requests per idle cycle",
        f"{idle['requests_per_cycle']:.2f}",
        f"target 2.0  {verdict(idle['requests_per_cycle'] == 2.0)}",
    )
    line(
        "CPU per idle cycle (utime+stime)",
        f"{idle['cpu_ms_per_cycle']:.1f} ms",
        f"(/proc/<pid>/stat, {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms ticks)",
    )
    line(
        "peak RSS while idle (VmHWM)",
        f"{idle['peak_rss'] / MIB:.1f} MiB",
        f"target < 40  {verdict(idle['peak_rss'] < 40 * MIB)}",
    )
    print(f"\nidle at POLL_INTERVAL_SECONDS={scale.fast_interval:g}, {scale.fast_cycles} cycles")
    line("TCP connections after the first cycle", f"{reuse['connections_at_first_cycle']:.0f}")
    line(
        "new connections per 100 idle cycles",
        f"{reuse['new_connections_per_100']:.0f}",
        f"target 0  {verdict(reuse['new_connections_per_100'] == 0)}",
    )
    line("hub requests per idle cycle", f"{reuse['requests_per_cycle']:.2f}")
    line("CPU per idle cycle (utime+stime)", f"{reuse['cpu_ms_per_cycle']:.1f} ms")

    print(
        f"\ntask latency, hub enqueue -> result recorded ({scale.latency_tasks} tasks at random "
        f"over {scale.latency_spread:g} s, POLL_INTERVAL_SECONDS={scale.latency_interval:g})"
    )
    line("p50", f"{latency['p50']:.2f} s")
    line("p95", f"{latency['p95']:.2f} s")
    line("max", f"{latency['max']:.2f} s")

    ratio = drained["seconds"] / drained["minimum"]
    print(
        f"\ndrain of {scale.drain_tasks} quick tasks at the real limits (30 heartbeats, 30 polls, "
        f"60 results per {scale.minute:g} s, hub and kit)"
    )
    line("time to drain (enqueue -> last result recorded)", f"{drained['seconds']:.1f} s")
    line(
        "limit-bound minimum (tasks / 60 per minute)",
        f"{drained['minimum']:.1f} s",
        f"ratio {ratio:.3f}, target <= 1.05  {verdict(ratio <= 1.05)}",
    )
    line("polls during the drain", f"{drained['polls']:.0f}")
    line(
        "429s from the hub",
        f"{drained['rate_limited']:.0f}",
        f"target 0  {verdict(drained['rate_limited'] == 0)}",
    )
    line("peak RSS after the drain (VmHWM)", f"{drained['peak_rss'] / MIB:.1f} MiB")

    bound = gap["interval"] + 1.0
    print(
        f"\nheartbeats while one {gap['handler']:.0f}-second handler runs "
        f"(POLL_INTERVAL_SECONDS={gap['interval']:g})"
    )
    line(
        "largest heartbeat gap",
        f"{gap['largest_gap']:.2f} s",
        f"target <= {bound:g} s  {verdict(gap['largest_gap'] <= bound)}",
    )
    line("heartbeats recorded across the handler", f"{gap['heartbeats']:.0f}")

    print()
    line(
        "peak RSS over every daemon above (VmHWM)",
        f"{peak / MIB:.1f} MiB",
        f"target < 40  {verdict(peak < 40 * MIB)}",
    )
    line(
        "429s in all the other runs",
        f"{idle['rate_limited'] + latency['rate_limited'] + gap['rate_limited']:.0f}",
    )
    print(f"\nbenchmark took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
