"""The resources the SDK returns: the API's own pydantic models, not a copy of them.

``Session`` (with ``SessionView``, what the API serves: the resource plus the orchestrator-compatible
``session_id``, ``machine_id``, ``created_at`` and ``state``), ``Pool``, ``Webhook``, ``Phase`` and
the rest are the classes of ``api/models.py``, ``api/pool_models.py`` and ``api/webhook_models.py``,
loaded through :func:`flyswarm._server.api_module` so that an installed SDK adds no ``api`` top-level package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flyswarm._server import api_module

if TYPE_CHECKING:
    from api.models import (
        TERMINAL_PHASES,
        AgentReport,
        Condition,
        MessageAccepted,
        Metadata,
        Phase,
        Reason,
        Session,
        SessionEvent,
        SessionSpec,
        SessionStatus,
        SessionUsage,
        SessionView,
    )
    from api.pool_models import Pool, PoolSpec, PoolStatus
    from api.webhook_models import DeliveryView, Webhook, WebhookEvent, WebhookSpec, WebhookStatus
else:
    _models = api_module("models")
    _pools = api_module("pool_models")
    TERMINAL_PHASES = _models.TERMINAL_PHASES
    AgentReport = _models.AgentReport
    Condition = _models.Condition
    MessageAccepted = _models.MessageAccepted
    Metadata = _models.Metadata
    Phase = _models.Phase
    Reason = _models.Reason
    Session = _models.Session
    SessionEvent = _models.SessionEvent
    SessionSpec = _models.SessionSpec
    SessionStatus = _models.SessionStatus
    SessionUsage = _models.SessionUsage
    SessionView = _models.SessionView
    Pool = _pools.Pool
    PoolSpec = _pools.PoolSpec
    PoolStatus = _pools.PoolStatus
    _webhooks = api_module("webhook_models")
    DeliveryView = _webhooks.DeliveryView
    Webhook = _webhooks.Webhook
    WebhookEvent = _webhooks.WebhookEvent
    WebhookSpec = _webhooks.WebhookSpec
    WebhookStatus = _webhooks.WebhookStatus

__all__ = [
    "TERMINAL_PHASES",
    "AgentReport",
    "Condition",
    "MessageAccepted",
    "Metadata",
    "Phase",
    "Pool",
    "PoolSpec",
    "PoolStatus",
    "Reason",
    "Session",
    "SessionEvent",
    "SessionSpec",
    "SessionStatus",
    "SessionUsage",
    "SessionView",
    "DeliveryView",
    "Webhook",
    "WebhookEvent",
    "WebhookSpec",
    "WebhookStatus",
    "shown_phase",
]


def shown_phase(session: Session | Mapping[str, Any]) -> Phase:
    """The phase to show for a served session: its (effective) phase, or ``Terminating`` once deleted.

    The API already serves the effective phase (a task whose agent reported its end is never shown
    running); a deleted session keeps its last phase until the controller has destroyed its machine,
    and is shown ``Terminating`` meanwhile. Takes the model or the plain JSON the API serves.
    """
    if not isinstance(session, Session):
        session = SessionView.model_validate(session)
    phase = session.effective_phase()
    if phase in TERMINAL_PHASES or not session.deleted:
        return phase
    return Phase.TERMINATING
