"""How trust-poller logs: one stderr handler that suits journald, and never shows a secret.

Under systemd, stderr is connected to the journal and JOURNAL_STREAM names that stream; then
lines carry a `<N>` priority prefix (sd-daemon(3)) instead of a timestamp. Otherwise lines read
`2026-11-27T12:00:00.123Z INFO logger: message`, or one JSON object each with `json`.

Every record passes a redaction filter on the handler that renders the message and any
traceback, scrubs them, and drops the raw arguments; the formatters scrub the final line again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

from trust_poller.redact import Redactor

LOG_FORMATS = ("text", "json")
_HANDLER_NAME = "trust-poller"
# Third-party loggers that would print URLs, headers or bodies at DEBUG.
_QUIET_LOGGERS = ("urllib3", "requests", "charset_normalizer")
_JOURNAL_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_PLAIN_FORMATTER = logging.Formatter()


def utc_timestamp(seconds: float | None = None) -> str:
    """`2026-11-27T12:00:00.123Z` for `seconds` since the epoch (default: now)."""
    moment = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def journal_priority(levelno: int) -> int:
    """The syslog priority journald should store for a logging level."""
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _JOURNAL_PRIORITY[threshold]
    return _JOURNAL_PRIORITY[logging.DEBUG]


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when JOURNAL_STREAM names this very stream (children inherit the variable)."""
    expected = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


class RedactionFilter(logging.Filter):
    """Renders each record's message and traceback, scrubbed, so no handler sees the raw text."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not crash the caller
            message = f"{record.msg!r} with arguments {record.args!r} (could not be formatted)"
        record.msg = self.redactor.scrub(message)
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _PLAIN_FORMATTER.formatException(record.exc_info)
            # Without exc_info no formatter can render the traceback again, unscrubbed.
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redactor.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.scrub(record.stack_info)
        return True


class TextFormatter(logging.Formatter):
    """`TIMESTAMP LEVEL logger: message`, or `<N>LEVEL logger: message` for the journal."""

    def __init__(self, redactor: Redactor, *, journal: bool = False) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.redactor = redactor
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = self.redactor.scrub(super().format(record))
        if self.journal:
            # Every line gets the prefix: journald stores each line as its own entry.
            prefix = f"<{journal_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        return f"{utc_timestamp(record.created)} {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and exc/stack when present."""

    def __init__(self, redactor: Redactor, *, journal: bool = False) -> None:
        super().__init__()
        self.redactor = redactor
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        scrub = self.redactor.scrub
        entry = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = scrub(record.exc_text)
        if record.stack_info:
            entry["stack"] = scrub(record.stack_info)
        line = scrub(json.dumps(entry))
        if self.journal:
            # journald strips the prefix, so the stored message is still plain JSON.
            return f"<{journal_priority(record.levelno)}>{line}"
        return line


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception goes through the redacting handler, not raw to stderr."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("trust_poller").critical(
        "thread %s stopped on an unexpected error (a bug in trust-poller; please report it)",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def setup_logging(
    *, verbose: bool = False, log_format: str = "text", stream: TextIO | None = None
) -> Redactor:
    """Send all logging to one redacting handler on stderr (or `stream`); return its Redactor.

    Call `.add(kit.secrets())` on the returned Redactor once the kit is loaded. Calling this
    again replaces the previous handler; handlers installed by others (pytest) are left alone.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    target = sys.stderr if stream is None else stream
    journal = stream_is_journal(target)
    redactor = Redactor()
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(redactor, journal=journal)
    else:
        formatter = TextFormatter(redactor, journal=journal)
    handler = logging.StreamHandler(target)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RedactionFilter(redactor))
    handler.setFormatter(formatter)

    root = logging.getLogger()
    previous = [h for h in root.handlers if h.get_name() == _HANDLER_NAME]
    others = [h for h in root.handlers if h.get_name() != _HANDLER_NAME]
    # First in line, so the records other root handlers see are already scrubbed; one
    # assignment, so a thread logging meanwhile sees either the old list or the new one.
    root.handlers = [handler, *others]
    for old in previous:
        old.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if threading.excepthook is threading.__excepthook__:  # leave a test runner's hook alone
        threading.excepthook = _log_thread_crash
    return redactor
