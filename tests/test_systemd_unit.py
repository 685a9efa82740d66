"""The shipped unit file: systemd accepts it, and its sandbox exposure stays low."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from trust_poller.hub import CONNECT_TIMEOUT, READ_TIMEOUT, REPLY_DEADLINE
from trust_poller.kit import DEFAULT_KIT_PATH, Kit
from trust_poller.playground.harness import cli_env, wait_until
from trust_poller.playground.loopback_hub import LoopbackHub
from trust_poller.playground.notify_listener import NotifyListener
from trust_poller.poller import FINAL_REPORT_SECONDS

pytestmark = pytest.mark.systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "trust-poller.service"
INSTALLED_BINARY = "/opt/trust-poller/bin/trust-poller"
MAX_EXPOSURE = 2.0


@pytest.fixture
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; CI must install it (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's console script (verify needs it to exist)."""
    text = UNIT.read_text(encoding="utf-8")
    assert INSTALLED_BINARY in text
    script = Path(sys.executable).parent / "trust-poller"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(script)), encoding="utf-8")
    return copy


def directives(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_unit_declares_what_the_daemon_relies_on() -> None:
    found = directives(UNIT.read_text(encoding="utf-8"))

    assert found["Type"] == ["notify"]
    assert found["ExecStart"] == [f"{INSTALLED_BINARY} run --kit ${{CREDENTIALS_DIRECTORY}}/kit"]
    assert found["LoadCredential"] == ["kit:/etc/trust-poller/kit.env"]
    assert int(found["WatchdogSec"][0]) > 0
    assert int(found["TimeoutStopSec"][0]) > 30  # above the default drain of 30 s
    assert "78" in found["RestartPreventExitStatus"][0].split()
    assert "2" in found["RestartPreventExitStatus"][0].split()
    assert found["Restart"] == ["on-failure"]
    assert found["StateDirectory"] == ["trust-poller"]
    assert found["StateDirectoryMode"] == ["0700"]
    assert found.get("DynamicUser") == ["yes"] or "User" in found
    families = found["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)


def test_systemd_analyze_verify_accepts_the_unit(systemd_analyze: str, unit_copy: Path) -> None:
    result = subprocess.run(
        [systemd_analyze, "verify", "--recursive-errors=no", "--man=no", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    complaints = [line for line in output.splitlines() if unit_copy.name in line]
    assert complaints == []


def test_security_exposure_is_at_most_two(systemd_analyze: str, unit_copy: Path) -> None:
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=20", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    assert float(match.group(1)) <= MAX_EXPOSURE


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match is not None, f"write {value!r} as N or Ns or Nmin"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_watchdog_outlasts_the_main_loops_longest_blocking_step() -> None:
    """A poll reply dripping in until its deadline must not look like a wedged loop."""
    found = directives(UNIT.read_text(encoding="utf-8"))
    longest_poll = CONNECT_TIMEOUT + REPLY_DEADLINE + READ_TIMEOUT

    assert _seconds(found["WatchdogSec"][0]) > longest_poll + 10


def test_stop_timeout_covers_the_default_drain_and_the_final_report() -> None:
    found = directives(UNIT.read_text(encoding="utf-8"))
    default_drain = next(f.default for f in dataclasses.fields(Kit) if f.name == "drain_timeout")
    assert isinstance(default_drain, float)
    threads_and_close = 10  # three thread joins of 2 s, the health probes' 3 s, closing up

    assert _seconds(found["TimeoutStopSec"][0]) >= (
        default_drain + FINAL_REPORT_SECONDS + threads_and_close
    )


def test_credential_is_loaded_from_the_default_kit_path() -> None:
    found = directives(UNIT.read_text(encoding="utf-8"))

    assert found["LoadCredential"] == [f"kit:{DEFAULT_KIT_PATH}"]


def test_the_units_exact_exec_start_runs_against_the_loopback_hub(
    hub: LoopbackHub, write_kit: Callable[..., Path], tmp_path: Path
) -> None:
    """ExecStart= as written, with only the binary path replaced, in systemd's environment."""
    credentials, state = tmp_path / "credentials", tmp_path / "state"
    credentials.mkdir(mode=0o500)
    state.mkdir(mode=0o700)
    kit = write_kit("credentials/kit")
    kit.chmod(0o400)  # as systemd leaves a credential
    (exec_start,) = directives(UNIT.read_text(encoding="utf-8"))["ExecStart"]
    argv = shlex.split(exec_start.replace("${CREDENTIALS_DIRECTORY}", str(credentials)))
    assert argv[0] == INSTALLED_BINARY
    argv[0] = str(Path(sys.executable).parent / "trust-poller")
    task = hub.enqueue("delete_imaging", {"imaging_project_id": str(uuid.uuid4())})

    with NotifyListener() as notify, (tmp_path / "daemon.log").open("w") as log:
        env = cli_env(
            CREDENTIALS_DIRECTORY=str(credentials),
            STATE_DIRECTORY=str(state),
            NOTIFY_SOCKET=notify.address,
            WATCHDOG_USEC="120000000",
        )
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            assert notify.wait_for("READY=1", 20), (tmp_path / "daemon.log").read_text()
            assert wait_until(lambda: hub.task(task).status == "COMPLETED", 20)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert notify.lines[0] == "READY=1"
        assert notify.lines[-1] == "STOPPING=1"
        assert "WATCHDOG=1" in notify.lines
    assert list(state.iterdir())  # the ledger lives in $STATE_DIRECTORY
    assert "readable by group or others" not in (tmp_path / "daemon.log").read_text()
