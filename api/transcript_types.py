"""The shapes of the SDK's ``SessionStore`` protocol, mirrored without importing the SDK or redis.

Shared by the Redis transcript store (:mod:`api.transcripts`, in the control plane) and its HTTP
client in the agent (:mod:`agent.channel_transcripts`); mypy matches them to the SDK's TypedDicts
structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NotRequired, Required, TypedDict


class TranscriptKey(TypedDict):
    """The SDK's ``SessionKey``."""

    project_key: str
    session_id: str
    subpath: NotRequired[str]


class TranscriptListKey(TypedDict):
    """The SDK's ``SessionListSubkeysKey``."""

    project_key: str
    session_id: str


class TranscriptEntry(TypedDict, total=False):
    """The SDK's ``SessionStoreEntry``: an opaque JSON transcript line."""

    type: Required[str]
    uuid: str
    timestamp: str


class TranscriptListEntry(TypedDict):
    """The SDK's ``SessionStoreListEntry``."""

    session_id: str
    mtime: int


class TranscriptSummary(TypedDict):
    """The SDK's ``SessionSummaryEntry``; ``data`` is opaque SDK state, stored verbatim."""

    session_id: str
    mtime: int
    data: dict[str, Any]


SummaryFold = Callable[[Any, Any, Any], Any]
"""``claude_agent_sdk.fold_session_summary(prev, key, entries) -> summary``."""
