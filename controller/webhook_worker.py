"""The webhook worker: fans session outboxes out into deliveries and sends them, beside the reconciler.

Runs in the leader only (:mod:`controller.main` starts it when the leader lease is won and cancels
it when lost), as its own task: no reconcile ever waits on a receiver. Each round:

1. **fan out**: read every session's outbox (pipelined; a cheap empty read for most sessions),
   build the deliveries of each entry (:mod:`controller.webhook_fanout`), queue them (idempotent by
   id), and only then delete the entries. A crash between the two re-queues nothing new;
2. **deliver**: claim due deliveries (each hidden from other claims for a visibility time longer
   than an attempt), group them by lane (one session to one target), and send each lane in order,
   ``webhook_concurrency`` attempts at once at most, each with its own timeout. A failed attempt is
   retried after an exponential backoff with jitter, until the retry window (counted from the
   event) is over; then the delivery is ``failed``. The rest of a lane waits behind a failed head.

Everything the worker knows lives in Redis, so a new leader (or the same one, restarted) picks up
exactly where the last one stopped; a delivery that was in flight when a worker died is sent again,
with the same ``webhook-id``, once its visibility time has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from api.logs import get_logger
from api.models import utcnow
from api.notify_models import WEBHOOK_TARGET_PREFIX, webhook_target
from api.store_base import StoreUnavailable
from api.store_controller import ClaimedDelivery, ControllerStore, OutboxEntry
from controller.metrics import ControllerMetrics
from controller.settings import ControllerSettings
from controller.webhook_fanout import deliveries_for
from controller.webhook_sender import Attempt, WebhookSender

_log = get_logger("controller.webhooks")

#: Session ids read per outbox pipeline.
OUTBOX_BATCH = 500


@dataclass(frozen=True)
class WebhookTiming:
    poll_seconds: float = 1.0
    timeout_seconds: float = 10.0
    concurrency: int = 8
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 3600.0
    retry_window_seconds: float = 86400.0
    retention_seconds: int = 7 * 86400

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> WebhookTiming:
        return cls(
            poll_seconds=settings.webhook_poll_seconds,
            timeout_seconds=settings.webhook_timeout_seconds,
            concurrency=settings.webhook_concurrency,
            backoff_base_seconds=settings.webhook_backoff_base_seconds,
            backoff_max_seconds=settings.webhook_backoff_max_seconds,
            retry_window_seconds=settings.webhook_retry_window_seconds,
        )

    @property
    def visibility_ms(self) -> int:
        """How long a claimed delivery stays hidden: past any attempt (resolve + request) with room."""
        return int((2 * self.timeout_seconds + 2) * 1000)

    def retry_delay(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        """Exponential in the attempts made, capped, with jitter over its upper half."""
        growth = float(2 ** min(attempts - 1, 30))
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * growth)
        return ceiling / 2 + rng() * ceiling / 2


async def fan_out_sessions(
    store: ControllerStore, session_ids: Sequence[str], metrics: ControllerMetrics | None, *, now_ms: int
) -> int:
    """Queue the deliveries of these sessions' outbox entries, then delete the entries.

    Idempotent (delivery ids are derived from the entries), so any replica may run it: the worker
    for every session each round, the executor for one session right before removing it (a session
    removed at once after finishing still sends its last events). Returns the entries handled.
    """
    entries = await store.outbox_entries(session_ids)
    if not entries:
        return 0
    webhooks = await store.webhooks_with_secrets()
    by_session: dict[str, list[OutboxEntry]] = defaultdict(list)
    for entry in entries:
        by_session[entry.session_id].append(entry)
    sessions = {s.id: s for s in await store.get_many(list(by_session))}
    for sid, found in by_session.items():
        session = sessions.get(sid)
        if session is not None:
            deliveries, problems = [], set()
            for entry in found:
                try:
                    made, found_problems = deliveries_for(session, [entry], webhooks)
                except ValueError as exc:  # pydantic's ValidationError too
                    # An entry no payload can be built from would block the outbox for good: drop it.
                    _log.error(
                        "webhook_outbox_unreadable",
                        session_id=sid,
                        entry=entry.entry_id,
                        error=type(exc).__name__,
                    )
                    continue
                deliveries += made
                problems.update(found_problems)
            for problem in sorted(problems):
                _log.warning("webhook_target_unsigned", session_id=sid, problem=problem)
            await store.enqueue(deliveries, now_ms=now_ms)
            for delivery in deliveries:
                if metrics is not None:
                    metrics.webhook_fanned_out.labels(event=delivery.event).inc()
        await store.ack_outbox(sid, [e.entry_id for e in found])
    return len(entries)


class WebhookWorker:
    """Fan-out and delivery rounds until cancelled (see the module docstring)."""

    def __init__(
        self,
        store: ControllerStore,
        sender: WebhookSender,
        *,
        timing: WebhookTiming,
        metrics: ControllerMetrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.sender = sender
        self.timing = timing
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(timing.concurrency)

    def nudge(self) -> None:
        """Look now (a status was just written) instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        _log.info("webhook_worker_started", concurrency=self.timing.concurrency)
        while True:
            self._wake.clear()
            try:
                await self.fan_out()
                await self.deliver_due()
                self.metrics.webhook_queue_depth.set(await self.store.delivery_queue_depth())
            except StoreUnavailable as exc:
                _log.warning("webhook_round_failed", error=str(exc))
            except Exception as exc:  # a bug must not end webhooks until the next leader: log, go on
                _log.exception("webhook_round_crashed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.timing.poll_seconds)

    # -- fan-out ----------------------------------------------------------------------------------

    async def fan_out(self) -> int:
        """Turn every pending outbox entry into queued deliveries; returns the entries handled."""
        ids = await self.store.all_ids()
        handled = 0
        for start in range(0, len(ids), OUTBOX_BATCH):
            handled += await fan_out_sessions(
                self.store, ids[start : start + OUTBOX_BATCH], self.metrics, now_ms=self._now_ms()
            )
        return handled

    # -- delivery ---------------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Claim due deliveries and send them lane by lane; returns the attempts made."""
        claimed = await self.store.claim_deliveries(
            now_ms=self._now_ms(), visibility_ms=self.timing.visibility_ms, limit=self.timing.concurrency * 8
        )
        if not claimed:
            return 0
        lanes: dict[str, list[ClaimedDelivery]] = defaultdict(list)
        for delivery in claimed:
            lanes[delivery.lane].append(delivery)
        alive = {webhook_target(w.webhook.name) for w in await self.store.webhooks_with_secrets()}
        results = await asyncio.gather(
            *(self._send_lane(sorted(lane, key=lambda d: d.delivery_id), alive) for lane in lanes.values()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            if isinstance(result, Exception):
                _log.warning("webhook_lane_failed", error=type(result).__name__)
        return sum(r for r in results if isinstance(r, int))

    async def _send_lane(self, lane: Sequence[ClaimedDelivery], alive: set[str]) -> int:
        attempts = 0
        for index, delivery in enumerate(lane):
            if delivery.target.startswith(WEBHOOK_TARGET_PREFIX) and delivery.target not in alive:
                await self._finish(delivery, "failed", None, "the webhook was deleted")
                continue
            async with self._slots:
                attempt = await self.sender.send(
                    url=delivery.url,
                    secret=delivery.secret,
                    msg_id=delivery.delivery_id,
                    body=delivery.body,
                    timestamp=int(self.clock().timestamp()),
                )
            attempts += 1
            self.metrics.webhook_latency.observe(attempt.seconds)
            if attempt.delivered:
                await self._finish(delivery, "delivered", attempt.status, "")
                continue
            next_ms = await self._failed(delivery, attempt)
            for later in lane[index + 1 :]:  # keep the lane in order: the rest wait behind the head
                await self.store.complete_delivery(
                    later.delivery_id, "postponed", now_ms=self._now_ms(), next_ms=next_ms
                )
            break
        return attempts

    async def _failed(self, delivery: ClaimedDelivery, attempt: Attempt) -> int:
        error = attempt.error or f"HTTP {attempt.status}"
        now_ms = self._now_ms()
        delay_ms = int(self.timing.retry_delay(delivery.attempts + 1) * 1000)
        give_up_ms = delivery.created_ms + int(self.timing.retry_window_seconds * 1000)
        if now_ms + delay_ms > give_up_ms:
            await self._finish(delivery, "failed", attempt.status, f"{error}; retry window over")
            return now_ms
        self.metrics.webhook_deliveries.labels(outcome="retry").inc()
        _log.info(
            "webhook_delivery_retrying",
            delivery_id=delivery.delivery_id,
            target=delivery.target,
            session_id=delivery.session_id,
            status=attempt.status,
            error=attempt.error,
            retry_in_seconds=round(delay_ms / 1000, 1),
        )
        await self.store.complete_delivery(
            delivery.delivery_id,
            "retry",
            now_ms=now_ms,
            next_ms=now_ms + delay_ms,
            http_status=attempt.status,
            error=error,
            now_iso=self.clock().isoformat(),
        )
        return now_ms + delay_ms

    async def _finish(self, delivery: ClaimedDelivery, outcome: Any, status: int | None, error: str) -> None:
        self.metrics.webhook_deliveries.labels(outcome=outcome).inc()
        name = "webhook_delivery_delivered" if outcome == "delivered" else "webhook_delivery_failed"
        _log.info(
            name,
            delivery_id=delivery.delivery_id,
            target=delivery.target,
            session_id=delivery.session_id,
            webhook_event=delivery.event,
            status=status,
            error=error or None,
        )
        await self.store.complete_delivery(
            delivery.delivery_id,
            outcome,
            now_ms=self._now_ms(),
            http_status=status,
            error=error,
            now_iso=self.clock().isoformat(),
            retention_seconds=self.timing.retention_seconds,
        )

    def _now_ms(self) -> int:
        return int(self.clock().astimezone(UTC).timestamp() * 1000)
