"""The README's "When things go wrong" catalogue: every row names tests, and every one exists."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## When things go wrong"
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
# The bad inputs issue 6 lists: each must have its row (matched in the first column).
REQUIRED_INPUTS = (
    "not JSON",
    "not a list",
    "without `id`",
    "without `task_type`",
    "without `payload`",
    "not a UUID",
    "twice in one batch",
    "empty body on 200",
    "HTML from a proxy",
    "redirect",
    "reset connection",
    "TLS failure",
    "never finishes",
    "size cap",
    "not base64",
    "`v` missing",
    "`kid`, `iv` or `ct` missing",
    "`v` other than 1",
    "unknown `kid`",
    "nonce that is not 12 bytes",
    "GCM tag",
    "plaintext is not JSON",
    "plaintext is JSON but not an object",
    "4xx with an HTML body",
    "5xx with an HTML body",
    "a 200 that is not JSON",
    "empty 204",
    "timeout",
    "connection refused",
    "too large to send as a result",
    "required key missing",
    "byte-order mark",
    "CRLF",
    "quoted values",
    "`export",
    "a key given twice",
    "`${...}`",
)


def catalogue_rows() -> list[list[str]]:
    """The section's table rows (header and separator left out), split into cells."""
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no '{HEADING}' section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


@cache
def defined_test_names(path: Path) -> frozenset[str]:
    """Names of the test functions a file defines, read from its syntax tree (not imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


def test_readme_has_a_catalogue_with_four_columns_and_dozens_of_rows() -> None:
    rows = catalogue_rows()
    assert len(rows) >= 60, f"only {len(rows)} rows"
    assert all(len(cells) == 4 for cells in rows), [cells[0] for cells in rows if len(cells) != 4]
    assert all(all(cells) for cells in rows), "a row has an empty cell"


def test_every_catalogue_row_names_at_least_one_test() -> None:
    unproven = [cells[0] for cells in catalogue_rows() if not TEST_REFERENCE.search(cells[-1])]
    assert not unproven, f"rows without a test: {unproven}"


def test_every_test_the_catalogue_names_exists() -> None:
    missing = []
    for cells in catalogue_rows():
        for file_name, test_name in TEST_REFERENCE.findall(cells[-1]):
            path = ROOT / file_name
            if not path.is_file() or test_name not in defined_test_names(path):
                missing.append(f"{file_name}::{test_name}")
    assert not missing, f"the catalogue names tests that do not exist: {missing}"


def test_the_catalogue_covers_every_bad_input_the_issue_lists() -> None:
    inputs = " ".join(cells[0] for cells in catalogue_rows())
    absent = [phrase for phrase in REQUIRED_INPUTS if phrase not in inputs]
    assert not absent, f"no catalogue row for: {absent}"
