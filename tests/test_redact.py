"""Redaction: a secret never leaves the process, in any form it can take on the way out."""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote, quote_plus

import pytest

from trust_poller.redact import MASK, Redactor

# Chosen so all seven forms differ: "/", "+", "?", "~", "=", "&", a space, and a base64 form
# that is padded and contains "/" (so the url-safe alphabet differs).
SECRET = "S3cr3t/T0k~n+v?lue=1&x yz"
OTHER = "second-Secret_9f8e7d6c5b4a"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def urlsafe_b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


FORMS = {
    "raw": SECRET,
    "base64": b64(SECRET),
    "base64-unpadded": b64(SECRET).rstrip("="),
    "urlsafe-base64": urlsafe_b64(SECRET),
    "urlsafe-base64-unpadded": urlsafe_b64(SECRET).rstrip("="),
    "percent-encoded": quote(SECRET, safe=""),
    "form-encoded": quote_plus(SECRET),
}


def test_the_forms_under_test_are_all_different() -> None:
    assert len(set(FORMS.values())) == len(FORMS)
    assert b64(SECRET).endswith("=")
    assert "/" in b64(SECRET)


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_every_encoded_form_of_a_secret_is_masked(form: str) -> None:
    text = f"upstream said: token={form}; retrying"
    assert Redactor([SECRET]).scrub(text) == f"upstream said: token={MASK}; retrying"


def test_every_occurrence_is_masked() -> None:
    text = f"{SECRET} and {b64(SECRET)} and again {SECRET}"
    assert Redactor([SECRET]).scrub(text) == f"{MASK} and {MASK} and again {MASK}"


def test_secret_inside_json_text_is_masked_and_json_stays_valid() -> None:
    text = json.dumps({"detail": f"bad key {SECRET}", "header": f"Basic {b64(SECRET)}"})
    scrubbed = Redactor([SECRET]).scrub(text)
    assert json.loads(scrubbed) == {"detail": f"bad key {MASK}", "header": f"Basic {MASK}"}


def test_text_without_secrets_is_unchanged() -> None:
    text = "heartbeat ok: trust Example (6f1c2d3e-4b5a-4789-9abc-def012345678)"
    assert Redactor([SECRET, OTHER]).scrub(text) == text


def test_redactor_without_secrets_changes_nothing_but_url_credentials() -> None:
    assert Redactor().scrub("plain text") == "plain text"
    assert Redactor().scrub("https://u:pw@h/x") == f"https://{MASK}@h/x"


def test_secrets_added_later_are_masked_along_with_earlier_ones() -> None:
    redactor = Redactor([SECRET])
    assert OTHER in redactor.scrub(OTHER)
    redactor.add([OTHER])
    assert redactor.scrub(f"{SECRET} {OTHER} {b64(OTHER)}") == f"{MASK} {MASK} {MASK}"


@pytest.mark.parametrize("short", ["", "a", "abc", "12345"])
def test_secret_shorter_than_6_characters_is_not_turned_into_a_pattern(short: str) -> None:
    text = "a 12345 abc abcabc 1234567 ok"
    assert Redactor([short]).scrub(text) == text


def test_empty_secret_does_not_mask_everything() -> None:
    assert Redactor(["", SECRET]).scrub("nothing secret here") == "nothing secret here"


def test_secret_of_6_characters_is_masked() -> None:
    assert Redactor(["abc123"]).scrub("x abc123 y") == f"x {MASK} y"


def test_secret_with_regex_metacharacters_is_matched_literally() -> None:
    secret = "a.b*c+d?(e)[f]|g^h$"
    redactor = Redactor([secret])
    assert redactor.scrub(f"key={secret}") == f"key={MASK}"
    assert redactor.scrub("key=aXbbbcddd") == "key=aXbbbcddd"


# --- overlapping secrets ---------------------------------------------------------------------


def test_secret_containing_another_is_masked_whole() -> None:
    redactor = Redactor(["abcdef", "abcdef123456"])
    assert redactor.scrub("k=abcdef123456;") == f"k={MASK};"
    assert redactor.scrub("k=abcdef;") == f"k={MASK};"


def test_secrets_overlapping_in_the_text_leave_no_fragment_of_either() -> None:
    redactor = Redactor(["aaaabbbb", "bbbbcccc"])
    assert redactor.scrub("x aaaabbbbcccc y") == f"x {MASK} y"
    assert Redactor(["bbbbcccc", "aaaabbbb"]).scrub("x aaaabbbbcccc y") == f"x {MASK} y"


def test_chain_of_overlapping_secrets_is_masked_as_one() -> None:
    redactor = Redactor(["secret-one-xyz", "one-xyz-more", "more-and-more"])
    assert redactor.scrub("[secret-one-xyz-more-and-more]") == f"[{MASK}]"


def test_adjacent_secrets_are_each_masked() -> None:
    assert Redactor([SECRET, OTHER]).scrub(SECRET + OTHER) == MASK + MASK


def test_secret_overlapping_its_own_repetition_is_masked_entirely() -> None:
    assert Redactor(["abababab"]).scrub("<ababababab>") == f"<{MASK}>"


# --- URL credentials -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:pass@host/x", f"https://{MASK}@host/x"),
        ("https://user:pass@host", f"https://{MASK}@host"),
        ("https://user@host/x", f"https://{MASK}@host/x"),
        ("https://:pass@host/x", f"https://{MASK}@host/x"),
        ("https://user:p@ss@host/x", f"https://{MASK}@host/x"),
        ("HTTPS://User:Pass@Host", f"HTTPS://{MASK}@Host"),
        ("postgresql://omop:pw?x@omop-db:5432/omop", f"postgresql://{MASK}@omop-db:5432/omop"),
        (
            "GET http://a:b@h1/x then http://c:d@h2/y",
            f"GET http://{MASK}@h1/x then http://{MASK}@h2/y",
        ),
    ],
)
def test_credentials_in_urls_are_masked(text: str, expected: str) -> None:
    assert Redactor().scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "https://hub.example.org/api/tasks/pending",
        "https://hub.example.org/api?contact=ops@example.org",
        "mail ops@example.org about https://hub.example.org/api",
        '{"url":"https://xnat:8080","email":"ops@example.org"}',
    ],
)
def test_urls_without_credentials_are_left_alone(text: str) -> None:
    assert Redactor().scrub(text) == text


def test_url_credentials_and_secrets_are_both_masked_in_one_text() -> None:
    text = f"proxy http://svc:hunter2@proxy:3128 rejected key {SECRET}"
    assert Redactor([SECRET]).scrub(text) == f"proxy http://{MASK}@proxy:3128 rejected key {MASK}"


def test_scrubbing_is_idempotent() -> None:
    redactor = Redactor([SECRET])
    once = redactor.scrub(f"https://u:p@h {SECRET}")
    assert redactor.scrub(once) == once


def test_long_dotted_run_is_scrubbed_in_linear_time() -> None:
    # A scheme-like run with no "://" once made the URL search quadratic (minutes at 1 MB).
    text = "a." * 500_000
    started = time.monotonic()
    assert Redactor([SECRET]).scrub(text) == text
    assert time.monotonic() - started < 5


def test_a_secret_cut_by_bounded_before_scrubbing_leaves_no_fragment() -> None:
    from trust_poller.outcome import bounded

    secret = "cutsecret-" + "Q" * 30
    text = bounded("x" * 1975 + secret, limit=2000)
    assert "cutsecret-QQQ" in text  # the cut kept only the secret's start

    scrubbed = Redactor([secret]).scrub(text)

    assert "cutsecret" not in scrubbed
    assert scrubbed.endswith("[REDACTED] [truncated]")


def test_text_before_a_cut_mark_that_is_no_secret_is_kept() -> None:
    scrubbed = Redactor(["completely-different-secret"]).scrub("plain words [truncated]")
    assert scrubbed == "plain words [truncated]"
