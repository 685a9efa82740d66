"""The shipped unit file: systemd accepts it, and its sandbox exposure stays low."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
