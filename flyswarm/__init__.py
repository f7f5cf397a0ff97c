"""flyswarm: the Python SDK of the flyswarm API (README "Python SDK").

::

    import flyswarm

    with flyswarm.Client() as client:               # FLYSWARM_URL, FLYSWARM_TOKEN
        session = client.create({"prompt": "List the files"})
        for event in client.events(session.id):
            print(event.type, event.data.get("message"))
        done = client.wait(session.id)                  # Succeeded or Failed
        print(done.status.phase, done.agent and done.agent.resultText)

:class:`Client` blocks, :class:`AsyncClient` awaits; both return the API's own models
(:class:`SessionView`, a :class:`Session` with the convenience fields the API adds; :class:`Pool`)
and raise the typed errors of :mod:`flyswarm.errors`.
"""

from flyswarm.async_client import AsyncClient
from flyswarm.calls import Applied, ArtifactList, Page
from flyswarm.client import Client
from flyswarm.errors import (
    ApiError,
    Conflict,
    FieldError,
    FlyswarmError,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    ServerError,
    ServerUnreachable,
    Timeout,
    Unauthorized,
    Unavailable,
)
from flyswarm.events import Event
from flyswarm.models import (
    TERMINAL_PHASES,
    MessageAccepted,
    Phase,
    Pool,
    Session,
    SessionEvent,
    SessionSpec,
    SessionView,
    Webhook,
    shown_phase,
)
from flyswarm.retry import Retry

__version__ = "0.1.0"

__all__ = [
    "TERMINAL_PHASES",
    "ApiError",
    "Applied",
    "ArtifactList",
    "AsyncClient",
    "Client",
    "Conflict",
    "Event",
    "FieldError",
    "FlyswarmError",
    "Forbidden",
    "Invalid",
    "MessageAccepted",
    "NotFound",
    "Page",
    "Phase",
    "Pool",
    "RateLimited",
    "Retry",
    "ServerError",
    "ServerUnreachable",
    "Session",
    "SessionEvent",
    "SessionSpec",
    "SessionView",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "Webhook",
    "shown_phase",
]
