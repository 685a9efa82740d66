"""The command line: parse, load the kit, call the core, map errors to exit codes.

No business logic lives here; the exit codes themselves are in errors.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from trust_poller import __version__
from trust_poller.dispatch import outcome_summary
from trust_poller.errors import (
    EXIT_INTERNAL_ERROR,
    EXIT_OK,
    EXIT_TEMPORARY,
    TrustPollerError,
)
from trust_poller.health import HealthCollector
from trust_poller.kit import (
    DEFAULT_KIT_PATH,
    Kit,
    check_kit_permissions,
    load_kit,
    warn_unresolvable_hosts,
)
from trust_poller.ledger import Ledger
from trust_poller.logs import setup_logging
from trust_poller.notify import SystemdNotifier
from trust_poller.poller import Daemon
from trust_poller.redact import Redactor
from trust_poller.state_dir import default_state_dir
from trust_poller.whoami import identify, render_identity

log = logging.getLogger("trust_poller")
Command = TypeVar("Command", bound=Callable[..., Any])
# Where systemd puts LoadCredential= copies (/run/credentials/<unit>/<name>).
SYSTEMD_CREDENTIALS_ROOT = Path("/run/credentials")


def common_options(command: Command) -> Command:
    """--kit, --log-format and -v, shared by every command."""
    options = [
        click.option(
            "--kit",
            "kit_path",
            type=click.Path(dir_okay=True, path_type=Path),
            envvar="TRUST_POLLER_KIT",
            default=DEFAULT_KIT_PATH,
            show_default=True,
            show_envvar=True,
            help="The trust's kit file (dotenv).",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="json writes one object per line, for log shippers.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def state_dir_option(command: Command) -> Command:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where claimed tasks and unsent results are kept. Default: $STATE_DIRECTORY, "
        "else /var/lib/trust-poller for root, else ~/.local/state/trust-poller.",
    )(command)


def exits_with_code(body: Callable[..., int]) -> Callable[..., None]:
    """One place that turns what a command raised into its exit code and one log line."""

    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = body(*args, **kwargs)
        except TrustPollerError as exc:
            log.error("%s", exc)
            code = exc.exit_code
        except KeyboardInterrupt:
            log.warning("interrupted; anything unsent is kept in the state directory")
            code = EXIT_TEMPORARY
        except Exception:
            log.exception("internal error (a bug in trust-poller; please report it)")
            code = EXIT_INTERNAL_ERROR
        sys.exit(code)

    return wrapper


def credential_source(kit_path: Path, environ: Mapping[str, str] | None = None) -> Path | None:
    """The kit file systemd copied `kit_path` from, when `kit_path` is that credential copy.

    The shipped unit loads the credential from the default kit path, so that is the file an
    operator edits and whose permissions matter; the copy's are systemd's.
    """
    env = os.environ if environ is None else environ
    roots = [SYSTEMD_CREDENTIALS_ROOT]
    if env.get("CREDENTIALS_DIRECTORY"):
        roots.append(Path(env["CREDENTIALS_DIRECTORY"]))
    path = kit_path.absolute()
    if path != DEFAULT_KIT_PATH and any(path.is_relative_to(root.absolute()) for root in roots):
        return DEFAULT_KIT_PATH
    return None


def start(kit_path: Path, log_format: str, verbose: bool) -> tuple[Kit, Redactor]:
    redactor = setup_logging(verbose=verbose, log_format=log_format)
    source = credential_source(kit_path)
    if source is not None:
        check_kit_permissions(source)
    kit = load_kit(kit_path, check_permissions=source is None)
    redactor.add(kit.secrets())
    return kit, redactor


@contextlib.contextmanager
def with_state(
    kit_path: Path, log_format: str, verbose: bool, state_dir: Path | None
) -> Iterator[tuple[Kit, Redactor, Ledger]]:
    """What `run` and `once` share: the kit, its redactor, host warnings, the locked state."""
    kit, redactor = start(kit_path, log_format, verbose)
    warn_unresolvable_hosts(kit)
    with Ledger.open(state_dir or default_state_dir()) as ledger:
        yield kit, redactor, ledger


@click.group()
@click.version_option(__version__, prog_name="trust-poller")
def main() -> None:
    """trust-poller: the trust-side agent of the FLIP hub. Every call it makes is outbound."""


@main.command()
@common_options
@state_dir_option
@exits_with_code
def run(kit_path: Path, log_format: str, verbose: bool, state_dir: Path | None) -> int:
    """Poll the hub forever (what systemd runs). SIGTERM/SIGINT drain and stop cleanly."""
    with with_state(kit_path, log_format, verbose, state_dir) as (kit, redactor, ledger):
        health = HealthCollector(kit)
        daemon = Daemon(
            kit, ledger, redactor, notifier=SystemdNotifier.from_environ(), health=health
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: daemon.request_stop())
        log.info("trust-poller %s started; state in %s", __version__, ledger.path)
        try:
            daemon.run()
        finally:
            health.close()
    log.info("trust-poller stopped")
    return EXIT_OK


@main.command()
@common_options
@state_dir_option
@exits_with_code
def once(kit_path: Path, log_format: str, verbose: bool, state_dir: Path | None) -> int:
    """One cycle: heartbeat, re-send, claim, run, report; then exit (for debugging)."""
    with with_state(kit_path, log_format, verbose, state_dir) as (kit, redactor, ledger):
        summary = Daemon(kit, ledger, redactor).once()
    unsent_ids = {entry.id for entry in summary.unsent}
    for record in summary.records:
        outcome = "not finished" if record.outcome is None else outcome_summary(record.outcome)
        delivery = "kept for later" if record.task_id in unsent_ids else "reported"
        click.echo(
            f"{record.task_id}  {record.task_type:<20}  {outcome:<40}  "
            f"{record.seconds:6.2f}s  {delivery}"
        )
    if not summary.records:
        click.echo("no tasks")
    if summary.unsent:
        log.warning(
            "%d results could not be delivered; they are kept in the state directory "
            "and re-sent by the next run",
            len(summary.unsent),
        )
        return EXIT_TEMPORARY
    return EXIT_OK


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@exits_with_code
def whoami(kit_path: Path, log_format: str, verbose: bool, as_json: bool) -> int:
    """Send one heartbeat and print who the hub says this kit is."""
    kit, _redactor = start(kit_path, log_format, verbose)
    report = identify(kit)
    click.echo(json.dumps(report.as_json(), indent=2) if as_json else render_identity(report))
    return report.exit_code


@main.command()
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("-v", "--verbose", is_flag=True, help="Show the poller's own log lines.")
@exits_with_code
def demo(log_format: str, verbose: bool) -> int:
    """A local playground: a loopback hub and trust services, one task of each type."""
    from trust_poller.playground.demo import run_demo

    setup_logging(verbose=verbose, log_format=log_format)
    if not verbose:
        logging.getLogger().setLevel(logging.ERROR)
    # The demo reports success or failure; a failed demo is a bug, not a kit or hub problem.
    return EXIT_OK if run_demo(click.echo) else EXIT_INTERNAL_ERROR
