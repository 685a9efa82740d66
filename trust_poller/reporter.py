"""The outbox sender: every durable, unacknowledged result goes to the hub until it answers.

Results are read from the ledger (write-ahead), cohort posts go before their task's
result, and each reply is read as the protocol page's "What a refusal means" says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential_jitter,
)
from tenacity.nap import sleep_using_event
from tenacity.wait import wait_base

from trust_poller.dispatch import StateWriter
from trust_poller.errors import IdentityMismatch
from trust_poller.hub import (
    Answer,
    Halted,
    HubClient,
    HubError,
    HubKeyRejected,
    ReportReply,
)
from trust_poller.identity import IdentityGuard
from trust_poller.kit import Kit
from trust_poller.ledger import Ledger, LedgerEntry, TaskState
from trust_poller.outcome import Outcome, bounded, failure, prepare_for_hub
from trust_poller.pacing import Backoff, HubBudgets, HubTrouble
from trust_poller.redact import Redactor

log = logging.getLogger(__name__)

REFUSED_MARKER = "the hub refused this task's result"


def cohort_refusal_report(refused: dict[str, Any], detail: str) -> dict[str, Any]:
    """The error report that replaces a cohort body the hub refused (so it never shows
    this trust as "running" forever)."""
    return {
        "query_id": refused.get("query_id"),
        "trust_id": refused.get("trust_id"),
        "created": str(refused.get("created", ""))[:10],
        "record_count": 0,
        "data": [],
        "error": bounded(detail, 500),
    }


class Reporter:
    def __init__(
        self,
        kit: Kit,
        ledger: Ledger,
        budgets: HubBudgets,
        guard: IdentityGuard,
        trouble: HubTrouble,
        writer: StateWriter,
        redactor: Redactor,
        halt: threading.Event,
    ) -> None:
        self.kit = kit
        self.ledger = ledger
        self.budgets = budgets
        self.guard = guard
        self.trouble = trouble
        self.writer = writer
        self.redactor = redactor
        self.halt = halt
        self.wakeup = threading.Event()
        # Between the attempts of one send; tests replace it to run without real waits.
        self.retry_wait: wait_base = wait_exponential_jitter(max=10, jitter=1)

    def wake(self, _task_id: str = "") -> None:
        self.wakeup.set()

    def _deliver(self, send: Callable[[], ReportReply]) -> ReportReply:
        """tenacity: transport errors, timeouts, 5xx and 429, about 3 attempts / 30 s."""
        for attempt in Retrying(
            retry=retry_if_exception_type(HubError),
            stop=stop_after_attempt(3) | stop_after_delay(30) | stop_when_event_set(self.halt),
            wait=self.retry_wait,
            sleep=sleep_using_event(self.halt),
            reraise=True,
        ):
            with attempt:
                return send()
        raise Halted  # unreachable: Retrying either returns or re-raises

    def _settle_cohort(self, client: HubClient, entry: LedgerEntry, outcome: Outcome) -> Outcome:
        body = outcome.cohort_post or {}
        reply = self._deliver(lambda: client.post_cohort_results(body))
        if reply.answer is Answer.ACKNOWLEDGED:
            self.writer.write(lambda: self.ledger.mark_cohort_delivered(entry.id))
            return outcome
        if body.get("error") is None:
            log.error("task %s: the hub refused its cohort results (%s)", entry.id, reply.detail)
            replaced = prepare_for_hub(
                failure(
                    f"the hub refused the cohort results ({reply.detail})",
                    cohort_post=cohort_refusal_report(body, reply.detail),
                ),
                self.redactor,
            )
            self.writer.write(
                lambda: self.ledger.replace_outcome(entry.id, replaced, cohort_pending=True)
            )
            return self._settle_cohort(client, entry, replaced)
        log.warning("task %s: the hub refused its cohort error report (%s)", entry.id, reply.detail)
        self.writer.write(lambda: self.ledger.mark_cohort_delivered(entry.id))
        return outcome

    def settle(self, client: HubClient, entry: LedgerEntry) -> Answer:
        """Send one outbox entry until the hub gives a final answer; raises when it can't."""
        outcome = entry.outcome
        if outcome is None:
            return Answer.RETIRED
        if entry.cohort_pending and outcome.cohort_post is not None:
            outcome = self._settle_cohort(client, entry, outcome)
        reply = self._deliver(
            lambda: client.report_result(self.budgets.results, entry.id, outcome.body())
        )
        if reply.answer is Answer.ACKNOWLEDGED:
            self.writer.write(lambda: self.ledger.mark_acknowledged(entry.id))
        elif reply.answer is Answer.RETIRED:
            log.warning(
                "task %s: the hub's answer is final, result retired (%s)", entry.id, reply.detail
            )
            self.writer.write(lambda: self.ledger.mark_retired(entry.id, reply.detail))
        elif reply.answer is Answer.AWAIT_REDELIVERY:
            log.info(
                "task %s was re-queued by the hub; its result waits for the redelivery", entry.id
            )
            self.writer.write(lambda: self.ledger.set_awaiting_redelivery(entry.id, True))
        elif (outcome.result or "").find(REFUSED_MARKER) >= 0:
            log.error("task %s: the hub refused even the short failure result; retired", entry.id)
            self.writer.write(lambda: self.ledger.mark_retired(entry.id, reply.detail))
            return Answer.RETIRED
        else:
            log.error(
                "task %s: the hub refused its result (%s); sending a short failure",
                entry.id,
                reply.detail,
            )
            short = failure(f"{REFUSED_MARKER} ({reply.detail})")
            self.writer.write(
                lambda: self.ledger.replace_outcome(entry.id, short, cohort_pending=False)
            )
            return Answer.BODY_REFUSED
        return reply.answer

    def send_pending(self, client: HubClient) -> bool:
        """One pass over the outbox; False when the hub could not be reached (kept for later)."""
        for entry in self.ledger.unsent():
            if self.halt.is_set():
                return False
            try:
                while self.settle(client, entry) is Answer.BODY_REFUSED:
                    refreshed = self.ledger.get(entry.id)
                    if refreshed is None or refreshed.state is not TaskState.FINISHED:
                        break
                    entry = refreshed
            except (HubError, HubKeyRejected) as exc:
                self.trouble.failed_call(exc)
                return False
            self.trouble.succeeded()
        self.trouble.succeeded()  # a complete pass also ends a problem whose entries are gone
        return True

    def run(self) -> None:
        """Thread body: send at start-up, on every finished task and every interval."""
        client = HubClient(self.kit, self.halt, on_identity=self.guard.check)
        backoff = Backoff(self.kit.poll_interval)
        try:
            while not self.halt.is_set():
                if not self.guard.verified.wait(1.0):
                    continue  # nothing is re-sent before the identity check has passed
                self.wakeup.clear()
                try:
                    delivered = self.send_pending(client)
                except (Halted, IdentityMismatch):
                    return
                if delivered:
                    backoff.reset()
                    self.wakeup.wait(self.kit.poll_interval)
                else:
                    self.halt.wait(backoff.next_delay())
        finally:
            client.close()
