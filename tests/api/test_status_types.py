"""Status writes are typed: reasons come from one enum, updates are validated before they are written."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from api import keys
from api.models import Phase, Reason, SessionSpec, SessionStatus, StatusUpdate
from tests.store import Store

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
async def store(redis_client: aioredis.Redis, redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    yield s  # type: ignore[misc]
    await s.close()


def test_a_status_reason_outside_the_documented_set_is_refused() -> None:
    with pytest.raises(ValidationError, match="reason"):
        SessionStatus.model_validate({"phase": "Failed", "reason": "Bogus"})
    status = SessionStatus.model_validate({"phase": "Failed", "reason": "BackoffLimitExceeded"})
    assert status.reason is Reason.BACKOFF_LIMIT_EXCEEDED


def test_reasons_travel_as_plain_strings() -> None:
    status = SessionStatus(phase=Phase.RUNNING, reason=Reason.AGENT_READY)
    assert json.loads(status.model_dump_json())["reason"] == "AgentReady"
    assert SessionStatus.model_validate_json('{"phase": "Running", "reason": "AgentReady"}') == status


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"phse": "Running"}, "phse"),
        ({"phase": "Bogus"}, "phase"),
        ({"reason": "BackOf"}, "reason"),
        ({"restarts": "many"}, "restarts"),
    ],
)
def test_a_status_update_refuses_unknown_fields_and_bad_values(fields: dict[str, str], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        StatusUpdate.model_validate(fields).applied_to(SessionStatus())


def test_a_status_update_sets_the_fields_it_names_and_keeps_the_others() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    old = SessionStatus(phase=Phase.RUNNING, reason=Reason.AGENT_READY, machineId="m1", restarts=2)
    new = StatusUpdate(phase=Phase.SLEEPING, reason=Reason.IDLE, lastHeartbeatAt=at).applied_to(old)
    assert (new.phase, new.reason, new.machineId, new.restarts, new.lastHeartbeatAt) == (
        Phase.SLEEPING,
        Reason.IDLE,
        "m1",
        2,
        at,
    )
    # Naming a field with None clears it; not naming it keeps it.
    assert StatusUpdate(reason=None).applied_to(old).reason is None
    with pytest.raises(ValidationError, match="phase"):
        StatusUpdate(phase=None).applied_to(old)


@pytest.mark.parametrize("update", [{"reason": "Bogus"}, {"phase": "Bogus"}, {"phse": "Running"}])
async def test_the_store_refuses_a_status_built_around_validation(
    store: Store, redis_client: aioredis.Redis, update: dict[str, str]
) -> None:
    await store.apply(store.new_session("typed", SessionSpec(prompt="p")))
    before = await redis_client.hget(keys.session("typed"), "status")
    smuggled = SessionStatus(phase=Phase.RUNNING).model_copy(update=update)
    with pytest.raises(ValueError):
        await store.write_status("typed", smuggled)
    assert await redis_client.hget(keys.session("typed"), "status") == before


def test_an_agent_reason_outside_the_set_becomes_the_default() -> None:
    assert Reason.reported("MaxTurns", Reason.AGENT_ERROR) is Reason.MAX_TURNS
    assert Reason.reported("ScriptedError", Reason.AGENT_ERROR) is Reason.AGENT_ERROR
    assert Reason.reported(None, Reason.COMPLETED) is Reason.COMPLETED


def test_the_readme_reasons_table_lists_every_reason_and_only_those() -> None:
    text = README.read_text()
    section = text.split("### Reasons", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Za-z]+)`", row.split("|")[1])}
    assert documented == {r.value for r in Reason}
