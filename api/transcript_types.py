"""The shapes of the SDK's ``SessionStore`` protocol, mirrored without importing the SDK or redis.

Shared by the Redis transcript store (:mod:`api.transcripts`, in the control plane) and its HTTP
client in the agent (:mod:`agent.channel_transcripts`); mypy matches them to the SDK's TypedDicts
structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NotRequired, Protocol, Required, TypedDict


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


class _Transcripts(Protocol):
    async def load(self, key: TranscriptKey) -> list[TranscriptEntry] | None: ...

    async def append(self, key: TranscriptKey, entries: list[TranscriptEntry]) -> None: ...

    async def list_subkeys(self, key: TranscriptListKey) -> list[str]: ...


async def copy_transcript(
    store: _Transcripts, claude_session_id: str, from_project: str, to_project: str
) -> int:
    """Copy a main transcript (and its subagent transcripts) to another project key; the entries copied.

    The SDK looks a transcript up under the project key of the current cwd; after a cwd change
    (another work root on the new machine) the agent copies it over so resume finds it. One
    definition for both transcript stores: it only needs ``load``, ``append`` and ``list_subkeys``.
    """
    source: TranscriptKey = {"project_key": from_project, "session_id": claude_session_id}
    entries = await store.load(source)
    if not entries:
        return 0
    await store.append({"project_key": to_project, "session_id": claude_session_id}, entries)
    for sub in await store.list_subkeys({"project_key": from_project, "session_id": claude_session_id}):
        sub_entries = await store.load({**source, "subpath": sub})
        if sub_entries:
            await store.append(
                {"project_key": to_project, "session_id": claude_session_id, "subpath": sub}, sub_entries
            )
    return len(entries)
