"""The README and kit.example describe every kit key the code reads, and kit.example loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trust_poller.kit import load_kit

ROOT = Path(__file__).resolve().parent.parent


def _keys_read_by_the_code() -> set[str]:
    source = (ROOT / "trust_poller" / "kit.py").read_text()
    return set(re.findall(r'"([A-Z][A-Z0-9_]{3,})"', source)) - {"CENTRAL"}


def test_code_reads_the_keys_this_test_expects() -> None:
    keys = _keys_read_by_the_code()
    assert {"CENTRAL_HUB_API_URL", "TRUST_API_KEY", "AES_KEY_BASE64", "HUB_CA_BUNDLE"} <= keys


@pytest.mark.parametrize("key", sorted(_keys_read_by_the_code()))
def test_every_kit_key_is_in_kit_example_and_the_readme_table(key: str) -> None:
    assert re.search(rf"^#?{key}=", (ROOT / "kit.example").read_text(), re.MULTILINE), key
    assert f"`{key}`" in (ROOT / "README.md").read_text(), key


def test_kit_example_is_a_valid_kit(tmp_path: Path) -> None:
    kit_file = tmp_path / "kit.env"
    kit_file.write_text((ROOT / "kit.example").read_text())
    kit_file.chmod(0o600)
    kit = load_kit(kit_file)
    assert kit.hub_url == "https://hub.example.org/api"
    assert kit.poll_interval == 5.0


def test_readme_starts_with_the_two_newcomer_commands() -> None:
    head = (ROOT / "README.md").read_text().split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in head.strip().splitlines() if line.strip()]
    assert commands[0].endswith("trust-poller demo")
    assert commands[1] == ".venv/bin/pytest"
    assert ".venv/bin/pytest" in (ROOT / ".ci" / "run").read_text().splitlines()
