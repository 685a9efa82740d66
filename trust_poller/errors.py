"""The exit codes of trust-poller, in one place, and the errors that lead to them.

Codes follow sysexits(3), as systemd.exec(5) documents them. Each error carries the text an
operator needs: what is wrong, where, and how to fix it — never a secret.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_HUB_UNAVAILABLE = 69
EXIT_INTERNAL_ERROR = 70
EXIT_TEMPORARY = 75
EXIT_KEY_REJECTED = 77
EXIT_CONFIG = 78


class TrustPollerError(Exception):
    """Base of the errors the CLI turns into an exit code and one log line."""

    exit_code = EXIT_INTERNAL_ERROR


class KitError(TrustPollerError):
    """The kit file is missing, unreadable or holds a bad value."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str | None, path: str, problem: str, fix: str) -> None:
        self.key = key
        self.path = path
        where = f"{key} in {path}" if key else path
        super().__init__(f"kit error: {where}: {problem}; fix: {fix}")


class StateError(TrustPollerError):
    """The state directory cannot be used (exit 78, names the path)."""

    exit_code = EXIT_CONFIG


class StateLocked(TrustPollerError):
    """Another trust-poller holds the state directory."""

    exit_code = EXIT_TEMPORARY


class IdentityMismatch(TrustPollerError):
    """The hub says this key belongs to another trust than the kit expects."""

    exit_code = EXIT_CONFIG


class KeyMismatch(TrustPollerError):
    """The hub's AES key fingerprint differs from this kit's (whoami only)."""

    exit_code = EXIT_CONFIG


class HubUnavailable(TrustPollerError):
    """The hub could not be reached or did not answer as the hub."""

    exit_code = EXIT_HUB_UNAVAILABLE


class KeyRejected(TrustPollerError):
    """The hub refused the API key (401/403)."""

    exit_code = EXIT_KEY_REJECTED


class ResultsUndelivered(TrustPollerError):
    """`once` finished but some results are still waiting in the outbox."""

    exit_code = EXIT_TEMPORARY


class DaemonCrashed(TrustPollerError):
    """A thread of the daemon died of a bug; exit 70 so systemd restarts a whole daemon."""


class PayloadRejected(Exception):
    """A task payload cannot be opened or is not valid: fails that task, never the daemon."""
