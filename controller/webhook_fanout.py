"""From a session's outbox entries to deliveries: who gets what, with which body and id. Pure.

An outbox entry (:mod:`api.store_webhook_queue`) is a phase change (``kind=phase``: from, to, the new
status, the agent's report and the metered usage as they were at that moment) or a notice
(``kind=notice``: an event type and its data). One entry gives one or two events (a change to
``Succeeded``/``Failed`` is also ``session.finished``), and each event goes to every target that
asked for it: the session's ``spec.notify`` entries and every Webhook whose selector matches the
session's labels.

The body is built here once and stored with the delivery, so every retry sends the same bytes.
The delivery id (``webhook-id``) is derived from the session's uid, the entry, the event and the
target: the same event to the same target gets the same id however often it is fanned out.
Ids sort by the entry's position, so within one lane (session x target) they sort in event order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from api.models import TERMINAL_PHASES, AgentReport, Phase, Session, SessionStatus, SessionUsage
from api.notify_models import WebhookEvent, notify_target, webhook_target
from api.store_controller import NewDelivery, OutboxEntry, StoredWebhook, outbox_data

#: The agent's result text is cut to this many characters in ``session.finished``.
RESULT_TEXT_LIMIT = 4000


def events_of(entry: OutboxEntry) -> list[tuple[WebhookEvent, dict[str, Any]]]:
    """The events one outbox entry stands for, with their ``data`` (without the session block)."""
    fields = entry.fields
    if fields.get("kind") == "notice":
        try:
            event = WebhookEvent(fields.get("type", ""))
        except ValueError:
            return []
        return [(event, outbox_data(fields, "data"))]
    if fields.get("kind") != "phase":
        return []
    status = SessionStatus.model_validate(outbox_data(fields, "status"))
    changed: dict[str, Any] = {
        "phase": fields.get("to"),
        "previousPhase": fields.get("from"),
        "reason": status.reason,
        "message": status.message,
        "machineId": status.machineId,
        "restarts": status.restarts,
    }
    found: list[tuple[WebhookEvent, dict[str, Any]]] = [(WebhookEvent.PHASE_CHANGED, changed)]
    if fields.get("to") in {p.value for p in TERMINAL_PHASES}:
        found.append((WebhookEvent.FINISHED, _finished(status, fields)))
    return found


def _finished(status: SessionStatus, fields: dict[str, str]) -> dict[str, Any]:
    agent = AgentReport.model_validate(outbox_data(fields, "agent")) if fields.get("agent") else None
    usage = SessionUsage.model_validate(outbox_data(fields, "usage")) if fields.get("usage") else None
    costs = [c for c in (usage.costUsd if usage else None, agent.costUsd if agent else None) if c]
    text = agent.resultText if agent is not None else None
    return {
        "phase": status.phase.value,
        "succeeded": status.phase is Phase.SUCCEEDED,
        "reason": status.reason,
        "message": status.message,
        "startedAt": status.startedAt.isoformat() if status.startedAt else None,
        "finishedAt": status.finishedAt.isoformat() if status.finishedAt else None,
        "result": None
        if agent is None
        else {
            "state": agent.state,
            "turns": agent.turns,
            "text": text[:RESULT_TEXT_LIMIT] if text else None,
            "truncated": bool(text and len(text) > RESULT_TEXT_LIMIT),
        },
        "costUsd": max(costs) if costs else 0.0,
        "usage": None
        if usage is None
        else {
            "requests": usage.requests,
            "inputTokens": usage.inputTokens,
            "outputTokens": usage.outputTokens,
            "cacheCreationInputTokens": usage.cacheCreationInputTokens,
            "cacheReadInputTokens": usage.cacheReadInputTokens,
        },
    }


def _delivery_id(session: Session, entry: OutboxEntry, ordinal: int, target: str) -> str:
    ms, _, seq = entry.entry_id.partition("-")
    digest = hashlib.sha256(
        f"{session.metadata.uid}|{entry.entry_id}|{ordinal}|{target}".encode()
    ).hexdigest()
    return f"msg_{int(ms):013d}{int(seq or 0):06d}{ordinal}_{digest[:20]}"


def deliveries_for(
    session: Session, entries: Sequence[OutboxEntry], webhooks: Sequence[StoredWebhook]
) -> tuple[list[NewDelivery], list[str]]:
    """The deliveries of ``entries`` (one session's, oldest first), and problems to log.

    A ``spec.notify`` entry whose ``secretRef`` names no Webhook (or one without a secret) gets no
    delivery (it could not be signed); that is reported in the second list.
    """
    out: list[NewDelivery] = []
    problems: list[str] = []
    by_name = {w.webhook.name: w for w in webhooks}
    session_block = {
        "name": session.id,
        "uid": session.metadata.uid,
        "labels": session.metadata.labels,
    }
    targets: list[tuple[str, str, list[WebhookEvent], str | None]] = []
    for index, notify in enumerate(session.spec.notify):
        secret = notify.secret
        if secret is None and notify.secretRef is not None:
            ref = by_name.get(notify.secretRef)
            secret = ref.secret if ref is not None else None
            if secret is None:
                problems.append(
                    f"spec.notify[{index}].secretRef: no webhook {notify.secretRef} with a secret"
                )
        targets.append((notify_target(session.id, index), notify.url, list(notify.events), secret))
    for hook in webhooks:
        if hook.spec.selector.matches(session.metadata.labels):
            name = webhook_target(hook.webhook.name)
            targets.append((name, hook.spec.url, list(hook.spec.events), hook.secret))
    for entry in entries:
        for ordinal, (event, data) in enumerate(events_of(entry)):
            body = json.dumps(
                {
                    "type": event.value,
                    "timestamp": entry.fields.get("at"),
                    "data": {"session": session_block, **data},
                },
                separators=(",", ":"),
            )
            for target, url, wanted, secret in targets:
                if event not in wanted or secret is None:
                    continue
                out.append(
                    NewDelivery(
                        delivery_id=_delivery_id(session, entry, ordinal, target),
                        target=target,
                        lane=f"{target}|{session.id}",
                        session_id=session.id,
                        event=event.value,
                        url=url,
                        secret=secret,
                        body=body,
                        created_ms=int(entry.entry_id.partition("-")[0]),
                    )
                )
    return out, problems
