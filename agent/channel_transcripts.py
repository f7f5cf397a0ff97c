"""Claude transcripts through the agent channel: the SDK's ``SessionStore`` protocol over HTTP.

The store behind the routes is :class:`api.transcripts.RedisTranscriptStore` in the control plane
(layout, idempotent appends, the delete cascade: see there); this is its client, implemented
structurally like it (no ``claude_agent_sdk`` import: the SDK passes its summary fold in).

The summary fold is SDK logic and the control plane does not install the SDK, so it runs here. An
append of a main transcript sends the entries, the summary folded from the last stored summary this
process saw (``summaryBase``), and that base. The control plane writes them in one transaction if
the base is still what is stored and every entry is new; otherwise it answers 409 with the stored
summary and the indices of the entries that are new, and the append folds those over that summary
and tries again. The first append after a machine change learns the stored summary this way; later
ones cost one request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from api.transcript_types import (
    SummaryFold,
    TranscriptEntry,
    TranscriptKey,
    TranscriptListEntry,
    TranscriptListKey,
    TranscriptSummary,
    copy_transcript,
)

if TYPE_CHECKING:
    from agent.channel import AgentChannel

_MAX_CONFLICTS = 20


class ChannelTranscripts:
    """A ``SessionStore`` for the transcripts of the channel's session."""

    def __init__(self, channel: AgentChannel, *, fold: SummaryFold | None = None) -> None:
        self._channel = channel
        self._fold = fold
        # (project key, claude session id) -> the summary last stored, as the control plane returned it.
        self._summaries: dict[tuple[str, str], dict[str, Any] | None] = {}

    # -- the protocol -----------------------------------------------------------------------------

    async def append(self, key: TranscriptKey, entries: list[TranscriptEntry]) -> None:
        """Store a batch in order; entries whose uuid is already stored are skipped."""
        if not entries:
            return
        wire_key = _wire_key(key)
        folds = self._fold is not None and not key.get("subpath")
        cache_key = (key["project_key"], key["session_id"])
        base = self._summaries.get(cache_key)
        pending = list(entries)
        for _attempt in range(_MAX_CONFLICTS):
            body: dict[str, Any] = {"key": wire_key, "entries": pending}
            if folds:
                assert self._fold is not None
                body["summary"] = dict(self._fold(base, dict(key), list(pending)))
                body["summaryBase"] = base
            response = await self._channel.request("POST", "/transcripts/append", json=body, accept=(409,))
            reply = response.json()
            if response.status_code != 409:
                if folds:
                    self._summaries[cache_key] = reply.get("summary")
                return
            base = reply.get("summary")
            pending = [pending[i] for i in reply.get("fresh", [])]
            if not pending:
                self._summaries[cache_key] = base
                return
        raise RuntimeError(f"transcript append kept conflicting after {_MAX_CONFLICTS} attempts")

    async def load(self, key: TranscriptKey) -> list[TranscriptEntry] | None:
        """Every entry of a transcript in append order; None when nothing was ever stored."""
        response = await self._channel.request("POST", "/transcripts/load", json={"key": _wire_key(key)})
        entries = response.json()["entries"]
        return None if entries is None else list(entries)

    async def list_sessions(self, project_key: str) -> list[TranscriptListEntry]:
        response = await self._channel.request(
            "GET", "/transcripts/sessions", params={"projectKey": project_key}
        )
        return list(response.json()["sessions"])

    async def list_session_summaries(self, project_key: str) -> list[TranscriptSummary]:
        response = await self._channel.request(
            "GET", "/transcripts/summaries", params={"projectKey": project_key}
        )
        return list(response.json()["summaries"])

    async def delete(self, key: TranscriptKey) -> None:
        """Delete one transcript; deleting a main transcript cascades to its subagent transcripts."""
        await self._channel.request("POST", "/transcripts/delete", json={"key": _wire_key(key)})
        if not key.get("subpath"):
            self._summaries.pop((key["project_key"], key["session_id"]), None)

    async def list_subkeys(self, key: TranscriptListKey) -> list[str]:
        wire = {"project_key": key["project_key"], "session_id": key["session_id"]}
        response = await self._channel.request("POST", "/transcripts/subkeys", json={"key": wire})
        return [str(s) for s in response.json()["subkeys"]]

    # -- beyond the protocol ----------------------------------------------------------------------

    async def project_keys(self) -> list[str]:
        """Every project key that has held a main transcript of this flyswarm session."""
        response = await self._channel.request("GET", "/transcripts/projects")
        return [str(p) for p in response.json()["projects"]]

    async def find_project_key(self, claude_session_id: str) -> str | None:
        """The project key under which a Claude session's main transcript is stored, if any."""
        for project_key in await self.project_keys():
            if any(s["session_id"] == claude_session_id for s in await self.list_sessions(project_key)):
                return project_key
        return None

    async def copy_transcript(self, claude_session_id: str, from_project: str, to_project: str) -> int:
        """Copy a main transcript (and its subagent transcripts) to another project key (a cwd change)."""
        return await copy_transcript(self, claude_session_id, from_project, to_project)


def _wire_key(key: TranscriptKey) -> dict[str, Any]:
    wire: dict[str, Any] = {"project_key": key["project_key"], "session_id": key["session_id"]}
    if key.get("subpath"):
        wire["subpath"] = key["subpath"]
    return wire
