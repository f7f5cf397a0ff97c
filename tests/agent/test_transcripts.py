"""The Redis transcript store: the SDK's own conformance suite, idempotency and session scoping."""

from __future__ import annotations

import itertools

import pytest
import redis.asyncio as aioredis
from claude_agent_sdk import fold_session_summary
from claude_agent_sdk.testing import run_session_store_conformance

from api import keys
from api.transcripts import RedisTranscriptStore, TranscriptEntry, TranscriptKey

_ids = itertools.count()

KEY: TranscriptKey = {"project_key": "-work-s1", "session_id": "9d4c7a52-1111-4b7e-9f00-000000000001"}


def entry(uuid: str, n: int) -> TranscriptEntry:
    return {"type": "user", "uuid": uuid, "n": n}  # type: ignore[typeddict-unknown-key]


async def test_passes_the_sdk_session_store_conformance_suite_with_every_optional_method(
    redis_client: aioredis.Redis,
) -> None:
    def make_store() -> RedisTranscriptStore:
        # A fresh flyswarm session per contract: the suite expects an empty store each time.
        return RedisTranscriptStore(redis_client, f"conf-{next(_ids)}", fold=fold_session_summary)

    await run_session_store_conformance(make_store)  # type: ignore[arg-type]
    # The suite really wrote under the flyswarm session's own key prefix.
    written = [k async for k in redis_client.scan_iter(match="fs:{conf-*}:tr:*")]
    assert written


async def test_a_retried_batch_is_stored_once(redis_client: aioredis.Redis) -> None:
    store = RedisTranscriptStore(redis_client, "s1", fold=fold_session_summary)
    batch = [entry("a", 1), entry("b", 2)]
    await store.append(KEY, batch)
    await store.append(KEY, [*batch, entry("c", 3)])
    loaded = await store.load(KEY)
    assert loaded == [entry("a", 1), entry("b", 2), entry("c", 3)]


async def test_entries_without_uuid_are_never_deduplicated(redis_client: aioredis.Redis) -> None:
    store = RedisTranscriptStore(redis_client, "s1")
    title: TranscriptEntry = {"type": "custom-title"}
    await store.append(KEY, [title])
    await store.append(KEY, [title])
    assert await store.load(KEY) == [title, title]


async def test_every_key_lives_under_the_session_hash_tag_and_in_its_key_registry(
    redis_client: aioredis.Redis,
) -> None:
    store = RedisTranscriptStore(redis_client, "s1", fold=fold_session_summary)
    await store.append(KEY, [entry("a", 1)])
    await store.append({**KEY, "subpath": "subagents/agent-1"}, [entry("b", 1)])
    registry = keys.session_registry("s1")
    written = {str(k) async for k in redis_client.scan_iter(match="*")} - {registry}
    assert written
    prefix = keys.transcript_prefix("s1")
    assert all(k.startswith(prefix) for k in written), written
    # The session's removal finds every transcript key here, without scanning the keyspace.
    assert await redis_client.smembers(registry) == written


async def test_two_flyswarm_sessions_do_not_see_each_others_transcripts(redis_client: aioredis.Redis) -> None:
    one = RedisTranscriptStore(redis_client, "one")
    two = RedisTranscriptStore(redis_client, "two")
    await one.append(KEY, [entry("a", 1)])
    assert await two.load(KEY) is None
    assert await two.list_sessions(KEY["project_key"]) == []


async def test_a_transcript_is_found_and_copied_after_the_work_dir_changed(
    redis_client: aioredis.Redis,
) -> None:
    store = RedisTranscriptStore(redis_client, "s1", fold=fold_session_summary)
    await store.append(KEY, [entry("a", 1), entry("b", 2)])
    await store.append({**KEY, "subpath": "subagents/agent-1"}, [entry("s", 1)])
    assert await store.find_project_key(KEY["session_id"]) == KEY["project_key"]
    copied = await store.copy_transcript(KEY["session_id"], KEY["project_key"], "-other-root")
    assert copied == 2
    moved: TranscriptKey = {"project_key": "-other-root", "session_id": KEY["session_id"]}
    assert await store.load(moved) == [entry("a", 1), entry("b", 2)]
    assert await store.list_subkeys(moved) == ["subagents/agent-1"]
    assert [s["session_id"] for s in await store.list_sessions("-other-root")] == [KEY["session_id"]]


@pytest.mark.parametrize("project_key", ["a/b", "with space", "ünïcode", "x:y"])
async def test_odd_project_keys_stay_isolated(redis_client: aioredis.Redis, project_key: str) -> None:
    store = RedisTranscriptStore(redis_client, "s1")
    await store.append({"project_key": project_key, "session_id": "s"}, [entry("a", 1)])
    assert await store.load({"project_key": project_key, "session_id": "s"}) == [entry("a", 1)]
    assert await store.load({"project_key": project_key + "/s", "session_id": "s"}) is None
