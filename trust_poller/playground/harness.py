"""Driving the real CLI as a child process: for the end-to-end tests and the benchmark."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Variables of the machine a test or benchmark must not inherit (CA bundles, proxies, systemd).
ENV_DROP = re.compile(
    r"^(REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|.*_PROXY|.*_proxy|NOTIFY_SOCKET|WATCHDOG_.*|"
    r"JOURNAL_STREAM|STATE_DIRECTORY|CREDENTIALS_DIRECTORY|TRUST_POLLER_KIT)$"
)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not ENV_DROP.match(k)}
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trust_poller", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        check=False,
    )


class Daemon:
    """`trust-poller run` as a child process, its stderr kept in a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trust_poller", *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, pattern: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log):
                return True
            if self.process.poll() is not None:
                return bool(re.search(pattern, self.log))
            time.sleep(0.05)
        return False

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        self._log.close()
        return code


def wait_until(predicate: Callable[[], Any], timeout: float = 20, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
