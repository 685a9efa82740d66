"""Logging: journald-aware lines, JSON, quiet third-party loggers, and no secret anywhere."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from trust_poller.logs import setup_logging, utc_timestamp
from trust_poller.redact import MASK

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
SECRET = "s3cr3t/T0ken+value=123&x"
QUIET = ("urllib3", "requests", "charset_normalizer")

log = logging.getLogger("trust_poller.test_logs")


def secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    ]


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo setup_logging: drop our handler, restore levels (pytest's handlers are its own)."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    root_level = root.level
    quiet_levels = {name: logging.getLogger(name).level for name in QUIET}
    yield
    for handler in [h for h in root.handlers if h.get_name() == "trust-poller"]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(root_level)
    for name, level in quiet_levels.items():
        logging.getLogger(name).setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def dev_ino(path: Path) -> str:
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


# --- timestamps ---------------------------------------------------------------------------


def test_utc_timestamp_formats_milliseconds_in_utc() -> None:
    assert utc_timestamp(1795780800.123) == "2026-11-27T12:00:00.123Z"
    assert utc_timestamp(0) == "1970-01-01T00:00:00.000Z"
    # Truncated, never rounded up into a fourth digit.
    assert utc_timestamp(59.9999) == "1970-01-01T00:00:59.999Z"


def test_utc_timestamp_ignores_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert utc_timestamp(1795780800.0) == "2026-11-27T12:00:00.000Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_utc_timestamp_defaults_to_now() -> None:
    before = utc_timestamp(time.time())
    now = utc_timestamp()
    after = utc_timestamp(time.time())
    assert re.fullmatch(TIMESTAMP, now)
    assert before <= now <= after


# --- text format and journald ---------------------------------------------------------------


def test_text_lines_carry_a_utc_timestamp_level_and_logger() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    log.info("hub answered in %d ms", 42)

    [line] = lines(stream)
    assert re.fullmatch(rf"{TIMESTAMP} INFO trust_poller\.test_logs: hub answered in 42 ms", line)
    stamp = line.split(" ", 1)[0]
    assert abs(time.time() - _parse(stamp)) < 60


def _parse(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_journal_stream_matching_the_handler_stream_gives_priority_prefixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w+", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", dev_ino(path))
        setup_logging(verbose=True, stream=stream)
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        stream.flush()
    assert path.read_text(encoding="utf-8").splitlines() == [
        "<7>DEBUG trust_poller.test_logs: d",
        "<6>INFO trust_poller.test_logs: i",
        "<4>WARNING trust_poller.test_logs: w",
        "<3>ERROR trust_poller.test_logs: e",
        "<2>CRITICAL trust_poller.test_logs: c",
    ]


def test_journal_traceback_lines_keep_the_error_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w+", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", dev_ino(path))
        setup_logging(stream=stream)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("task failed")
        stream.flush()
    written = path.read_text(encoding="utf-8").splitlines()
    assert written[0] == "<3>ERROR trust_poller.test_logs: task failed"
    assert written[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in written)


def test_journal_stream_of_another_file_keeps_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    other.write_text("")
    path = tmp_path / "log"
    with path.open("w+", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", dev_ino(other))
        setup_logging(stream=stream)
        log.info("hello")
        stream.flush()
    [line] = path.read_text(encoding="utf-8").splitlines()
    assert re.fullmatch(rf"{TIMESTAMP} INFO trust_poller\.test_logs: hello", line)


@pytest.mark.parametrize("journal_stream", ["1:2", "garbage", ""])
def test_journal_stream_with_a_stream_without_fileno_keeps_timestamps(
    journal_stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    stream = io.StringIO()  # fileno() raises io.UnsupportedOperation, like CliRunner's streams
    setup_logging(stream=stream)
    log.info("hello")
    [line] = lines(stream)
    assert re.fullmatch(rf"{TIMESTAMP} INFO trust_poller\.test_logs: hello", line)


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    log.warning("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "WARNING trust_poller.test_logs: to stderr" in captured.err


# --- JSON -------------------------------------------------------------------------------------


def test_json_lines_have_ts_level_logger_msg() -> None:
    stream = io.StringIO()
    setup_logging(log_format="json", stream=stream)
    log.info("claimed %d tasks", 3)

    [line] = lines(stream)
    entry = json.loads(line)
    assert set(entry) == {"ts", "level", "logger", "msg"}
    assert re.fullmatch(TIMESTAMP, entry["ts"])
    assert entry["level"] == "INFO"
    assert entry["logger"] == "trust_poller.test_logs"
    assert entry["msg"] == "claimed 3 tasks"


def test_json_exception_is_one_line_with_exc() -> None:
    stream = io.StringIO()
    setup_logging(log_format="json", stream=stream)
    try:
        raise KeyError("missing")
    except KeyError:
        log.exception("handler crashed")

    [line] = lines(stream)
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["msg"] == "handler crashed"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert entry["exc"].endswith("KeyError: 'missing'")


def test_json_under_journald_keeps_plain_json_after_the_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal"
    with path.open("w+", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", dev_ino(path))
        setup_logging(log_format="json", stream=stream)
        log.warning("slow hub")
        stream.flush()
    [line] = path.read_text(encoding="utf-8").splitlines()
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["msg"] == "slow hub"


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        setup_logging(log_format="xml", stream=io.StringIO())


# --- levels -----------------------------------------------------------------------------------


def test_info_by_default_hides_debug() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    log.debug("hidden")
    log.info("shown")
    assert [line.split(": ", 1)[1] for line in lines(stream)] == ["shown"]


def test_verbose_shows_debug_but_keeps_http_libraries_at_warning() -> None:
    stream = io.StringIO()
    setup_logging(verbose=True, stream=stream)
    log.debug("ours")
    for name in QUIET:
        logging.getLogger(name).debug("GET /api/tasks?token=abc")
        logging.getLogger(f"{name}.connectionpool").info("connection opened")
        logging.getLogger(name).warning(f"{name} warns")

    assert logging.getLogger().level == logging.DEBUG
    for name in QUIET:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    messages = [line.split(": ", 1)[1] for line in lines(stream)]
    assert messages == ["ours", *(f"{name} warns" for name in QUIET)]


# --- handler replacement --------------------------------------------------------------------


def test_calling_setup_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stream=first)
    setup_logging(log_format="json", stream=second)
    log.info("once")

    ours = [h for h in logging.getLogger().handlers if h.get_name() == "trust-poller"]
    assert len(ours) == 1
    assert first.getvalue() == ""
    assert len(lines(second)) == 1
    assert json.loads(lines(second)[0])["msg"] == "once"


def test_a_bad_format_string_is_logged_not_raised() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    log.info("%d tasks", "many")
    [line] = lines(stream)
    assert "could not be formatted" in line


# --- redaction --------------------------------------------------------------------------------


def assert_no_secret(text: str, secret: str = SECRET) -> None:
    for form in secret_forms(secret):
        assert form not in text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secret_and_its_encodings_never_appear_in_messages_or_args(log_format: str) -> None:
    stream = io.StringIO()
    redactor = setup_logging(verbose=True, log_format=log_format, stream=stream)
    redactor.add([SECRET])  # as the CLI does once the kit is loaded
    encoded = base64.b64encode(SECRET.encode()).decode()

    log.debug(f"literal {SECRET} in the message")
    log.debug("as an argument: %s", SECRET)
    log.info("base64 header: Basic %s", encoded)
    log.warning("url: https://hub.example.org/api?key=%s", quote(SECRET, safe=""))
    log.error("form: key=%s", quote_plus(SECRET))
    log.debug("mapping %(key)s", {"key": SECRET})
    logging.getLogger("some.library").info("repr %r", {"token": SECRET})

    output = stream.getvalue()
    assert len(lines(stream)) == 7
    assert output.count(MASK) >= 7
    assert_no_secret(output)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secret_never_appears_in_tracebacks_at_debug(log_format: str) -> None:
    stream = io.StringIO()
    redactor = setup_logging(verbose=True, log_format=log_format, stream=stream)
    redactor.add([SECRET])
    encoded = base64.b64encode(SECRET.encode()).decode()

    try:
        try:
            raise ConnectionError(f"Authorization: Basic {encoded}")
        except ConnectionError as cause:
            raise RuntimeError(f"hub refused key {SECRET}") from cause
    except RuntimeError:
        log.debug("report failed", exc_info=True)
        log.exception("report failed for %s", SECRET)
    log.debug("where am I", stack_info=True)

    output = stream.getvalue()
    assert "Traceback (most recent call last)" in output
    assert "RuntimeError: hub refused key" in output
    assert "ConnectionError: Authorization: Basic" in output
    assert_no_secret(output)


def test_secret_with_json_special_characters_is_redacted_in_json() -> None:
    secret = 'pa"ss\\word-with-quote'
    stream = io.StringIO()
    redactor = setup_logging(log_format="json", stream=stream)
    redactor.add([secret])
    log.info("key is %s", secret)

    entry = json.loads(lines(stream)[0])
    assert entry["msg"] == f"key is {MASK}"
    assert_no_secret(stream.getvalue(), secret)
    assert json.dumps(secret)[1:-1] not in stream.getvalue()


def test_other_root_handlers_receive_already_redacted_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    redactor = setup_logging(verbose=True, stream=io.StringIO())
    redactor.add([SECRET])
    try:
        raise ValueError(SECRET)
    except ValueError:
        log.exception("failed with %s", SECRET)

    assert MASK in caplog.text
    assert_no_secret(caplog.text)
    [record] = caplog.records
    assert record.args is None
    assert record.exc_info is None


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("secret", [SECRET, 'pa"ss\\word-with-quote'])
def test_formatter_scrubs_even_without_the_filter(log_format: str, secret: str) -> None:
    stream = io.StringIO()
    redactor = setup_logging(log_format=log_format, stream=stream)
    redactor.add([secret])
    [handler] = [h for h in logging.getLogger().handlers if h.get_name() == "trust-poller"]
    handler.filters.clear()
    try:
        raise ValueError(secret)
    except ValueError:
        log.exception("leak %s", secret)

    output = stream.getvalue()
    assert output.count(MASK) >= 2
    assert_no_secret(output, secret)
    assert json.dumps(secret)[1:-1] not in output


def test_credentials_inside_urls_are_masked() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    log.info("proxy %s", "http://alice:hunter2-pass@proxy.local:3128")

    assert "hunter2-pass" not in stream.getvalue()
    assert f"http://{MASK}@proxy.local:3128" in stream.getvalue()
