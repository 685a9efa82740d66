"""Where trust-poller keeps its state, the lock that lets one poller use it, and its database.

The directory is created 0700 and every file in it is kept 0600: the ledger holds sealed
task envelopes and results on their way to the hub. The lock is an exclusive `flock` on
`<dir>/lock`, so the kernel releases it whenever the holder dies, even by kill -9. A damaged
database is renamed aside and replaced by a fresh one, so a bad file never causes a crash loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from trust_poller.errors import StateError, StateLocked

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
DB_FILE = "state.db"
_DB_FILES = (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm")
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """systemd's $STATE_DIRECTORY, else the root or per-user state location."""
    env = os.environ if environ is None else environ
    from_systemd = env.get("STATE_DIRECTORY", "").split(":")[0]
    if from_systemd:
        return Path(from_systemd)
    if os.geteuid() == 0:
        return Path("/var/lib/trust-poller")
    xdg_state_home = env.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg_state_home and Path(xdg_state_home).is_absolute():
        return Path(xdg_state_home) / "trust-poller"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "trust-poller"


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Files and directories created inside are private to the owner (umask is per process)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def how_to_fix(error: OSError, path: Path) -> str:
    """One line an operator can act on, for an OSError met while using `path`."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"give the user running trust-poller (uid {os.geteuid()}) read and write access "
            f"to {path}, or point STATE_DIRECTORY at a directory it owns"
        )
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{path} or one of its parents is not a directory: choose another state directory"
    if error.errno == errno.EROFS:
        return "the file system is read-only: choose a state directory on a writable one"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space"
    return "check that the state directory is a writable local directory"


def unusable(path: Path, problem: object, fix: str) -> StateError:
    return StateError(f"state directory {path} cannot be used: {problem}; fix: {fix}")


def make_state_dir(path: Path) -> None:
    """Create `path` (and missing parents) 0700; an existing directory is used as it is."""
    try:
        with private_files():
            path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as error:
        raise unusable(path, error.strerror or error, how_to_fix(error, path)) from error


def restrict_modes(*paths: Path) -> None:
    """chmod 0600 the files that exist (sqlite's -wal and -shm come and go)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.chmod(PRIVATE_FILE_MODE)


def sync_directory(path: Path) -> None:
    """fsync a directory so the files just created in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateDirLock:
    """An exclusive, non-blocking flock on `<state_dir>/lock`, holding our pid."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None
        fd = -1
        try:
            with private_files():
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, PRIVATE_FILE_MODE)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateLocked(
                f"another trust-poller (pid {holder}) holds the state directory {state_dir}; "
                "run only one per kit"
            ) from None
        except OSError as error:
            if fd >= 0:
                os.close(fd)
            fix = how_to_fix(error, state_dir)
            raise unusable(state_dir, error.strerror or error, fix) from error
        self._fd = fd

    def release(self) -> None:
        """Closing the file drops the flock; the file stays (deleting it would race a new owner)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def set_aside(db_path: Path, reason: object) -> Path:
    """Rename a damaged database and its -wal/-shm to `<name>.corrupt-<UTC time>[-wal|-shm]`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = db_path.with_name(f"{db_path.name}.corrupt-{stamp}")
    attempt = 0
    while target.exists():
        attempt += 1
        target = db_path.with_name(f"{db_path.name}.corrupt-{stamp}-{attempt}")
    try:
        # Database first: a crash part-way leaves at worst an orphan -wal, which open() sets
        # aside too; a database left without its -wal could pass as an older, wrong state.
        for suffix in ("", "-wal", "-shm"):
            source = db_path.with_name(db_path.name + suffix)
            if source.exists():
                source.rename(target.with_name(target.name + suffix))
        sync_directory(db_path.parent)
    except OSError as error:
        raise unusable(
            db_path.parent,
            f"{db_path} is damaged ({reason}) and could not be moved aside: {error}",
            how_to_fix(error, db_path.parent),
        ) from error
    log.error(
        "state database %s is damaged (%s): moved it aside to %s and started a fresh one; "
        "any result not yet sent that was in it is still in that file",
        db_path,
        reason,
        target,
    )
    return target


class _Damaged(Exception):
    pass


def is_damage(error: sqlite3.Error) -> bool:
    """sqlite says the file is not a database or is corrupt (not merely unwritable)."""
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _as_os_error(error: sqlite3.Error) -> OSError:
    """The OSError an sqlite error stands for, so the operator gets the same fix text."""
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return PermissionError(errno.EACCES, str(error))
    return OSError(errno.ENOSPC if code == sqlite3.SQLITE_FULL else errno.EIO, str(error))


def _connect(
    state_dir: Path, format_version: int, migrations: Mapping[int, Sequence[str]]
) -> sqlite3.Connection:
    db_path = state_dir / DB_FILE
    try:
        # Pre-created 0600: sqlite gives its -wal and -shm the database file's permissions.
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
        db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    except (OSError, sqlite3.Error) as error:
        fault = error if isinstance(error, OSError) else _as_os_error(error)
        raise unusable(state_dir, f"{db_path}: {error}", how_to_fix(fault, state_dir)) from error
    try:
        problems = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _Damaged("quick_check: " + "; ".join(problems)[:500])
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > format_version:
            raise StateError(
                f"state database {db_path} is format {version}, written by a newer trust-poller; "
                f"this one reads formats up to {format_version}; fix: upgrade trust-poller"
            )
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("state database %s cannot use WAL (journal mode %s)", db_path, mode)
        db.execute("PRAGMA synchronous=FULL")
        for target in range(version + 1, format_version + 1):
            db.execute("BEGIN IMMEDIATE")
            for statement in migrations[target]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target:d}")
            db.execute("COMMIT")
            if version > 0:
                log.info("state database %s upgraded to format %d", db_path, target)
    except sqlite3.Error as error:
        db.close()  # also rolls back a half-done migration
        if is_damage(error):
            raise _Damaged(str(error)) from error
        fix = how_to_fix(_as_os_error(error), state_dir)
        raise unusable(state_dir, f"{db_path}: {error}", fix) from error
    except BaseException:
        db.close()
        raise
    return db


def open_database(
    state_dir: Path, format_version: int, migrations: Mapping[int, Sequence[str]]
) -> sqlite3.Connection:
    """`<state_dir>/state.db` in WAL mode, synchronous=FULL, migrated to `format_version`.

    `migrations[n]` holds the statements that turn format n-1 into format n.
    """
    db_path = state_dir / DB_FILE
    with private_files():
        if not db_path.exists() and any((state_dir / name).exists() for name in _DB_FILES):
            set_aside(db_path, "a -wal file was found without its database")
        try:
            db = _connect(state_dir, format_version, migrations)
        except _Damaged as damage:
            set_aside(db_path, damage)
            try:
                db = _connect(state_dir, format_version, migrations)
            except _Damaged as again:
                fix = "check the disk and the file system holding it"
                raise unusable(state_dir, f"a fresh {db_path} is damaged: {again}", fix) from again
    try:
        restrict_modes(*(state_dir / name for name in _DB_FILES))
        sync_directory(state_dir)
    except OSError as error:
        db.close()
        raise unusable(state_dir, error, how_to_fix(error, state_dir)) from error
    return db
