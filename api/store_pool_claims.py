"""Pools, the controller's half: pool machine records, the atomic claim, pool status and removal.

Mixed into :class:`api.store_controller.ControllerStore`. Every key touched here carries the pool's
hash tag (:func:`api.keys.pool`), so each script and transaction stays in one Redis Cluster slot.

* **Records** (``keys.pool_machines``: machine id -> JSON :class:`PoolMachineRecord`) say what the
  controller made of each unclaimed machine: ``booting`` (created, agent not yet parked),
  ``ready`` (parked: suspended or stopped, in ``keys.pool_ready``) and ``claimed`` (popped by a
  session whose side of the claim is not finished yet).
* **The claim** (:meth:`PoolClaims.claim_pool_machine`) is one Lua script: a session that already
  holds a claim gets the same machine back (a controller killed mid-claim is completed by the next
  pass, never given a second machine); otherwise ``SPOP`` of the ready set, the record turned to
  ``claimed`` and ``keys.pool_claims`` (session -> machine) written, together. ``SPOP`` hands each
  machine out once, whichever controller asks, so no machine serves two sessions.
* **Fencing**, as for status writes (:mod:`api.store_controller`): the claims hash keeps, per fence
  key, the highest token that claimed from this pool (field ``fence:<key>``; ``:`` never occurs in
  a session id), and a claim with a lower token is refused; a plain ``GET`` of the fence key just
  before narrows the rest of the window.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from api import keys
from api.models import Metadata
from api.pool_models import Pool, PoolSpec, PoolStatus
from api.store_base import StoreBase, unavailable_on_redis_error

PoolMachineState = Literal["booting", "ready", "claimed"]
ClaimResult = tuple[str, "PoolMachineRecord"] | Literal["fenced"] | None

_FENCE_PREFIX = "fence:"

# KEYS: machines hash, ready set, claims hash. ARGV: session id, claimed-at json string
# [, fence field, fence token]. Returns {machine id, record json}, {} (nothing ready) or -2 (fenced).
_CLAIM_LUA = """
local token = nil
if #ARGV > 2 then
  token = tonumber(ARGV[4])
  local seen = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
  if token < seen then return -2 end
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
end
local held = redis.call('HGET', KEYS[3], ARGV[1])
if held then
  local rec = redis.call('HGET', KEYS[1], held)
  if rec then return {held, rec} end
  redis.call('HDEL', KEYS[3], ARGV[1])
end
while true do
  local id = redis.call('SPOP', KEYS[2])
  if not id then return {} end
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    local rec = cjson.decode(raw)
    if rec['state'] == 'ready' then
      rec['state'] = 'claimed'
      rec['session'] = ARGV[1]
      rec['claimedAt'] = ARGV[2]
      local out = cjson.encode(rec)
      redis.call('HSET', KEYS[1], id, out)
      redis.call('HSET', KEYS[3], ARGV[1], id)
      return {id, out}
    end
  end
end
"""

# KEYS: machines hash, ready set. ARGV: machine id. 1 if the machine was ready and is now withdrawn
# (the caller may destroy it), 0 if a claim took it first (or it was not ready).
_WITHDRAW_LUA = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: pool hash. ARGV: status json. A removed pool is not brought back as a status-only hash.
_STATUS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class PoolMachineRecord:
    """What the controller knows of one pool machine beyond Fly's view of it."""

    machine_id: str
    slot: str
    state: PoolMachineState
    template: str  #: digest of the pool template it was created from (a change replaces it)
    created_at: datetime
    session: str | None = None
    claimed_at: datetime | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["createdAt"] = self.created_at.isoformat()
        data["claimedAt"] = self.claimed_at.isoformat() if self.claimed_at else None
        del data["created_at"], data["claimed_at"], data["machine_id"]
        data["machineId"] = self.machine_id
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, machine_id: str, raw: str) -> PoolMachineRecord | None:
        try:
            data = json.loads(raw)
            claimed = data.get("claimedAt")
            return cls(
                machine_id=machine_id,
                slot=str(data["slot"]),
                state=data["state"],
                template=str(data.get("template", "")),
                created_at=datetime.fromisoformat(data["createdAt"]),
                session=data.get("session") or None,
                claimed_at=datetime.fromisoformat(claimed) if claimed else None,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def claimed(self, session_id: str, at: datetime) -> PoolMachineRecord:
        return replace(self, state="claimed", session=session_id, claimed_at=at)


@dataclass(frozen=True)
class PoolState:
    """Everything Redis holds about one pool's machines, read together."""

    records: dict[str, PoolMachineRecord] = field(default_factory=dict)
    ready: frozenset[str] = frozenset()
    claims: dict[str, str] = field(default_factory=dict)  #: session id -> machine id
    booted: dict[str, datetime] = field(default_factory=dict)  #: slot -> when its agent booted


def pool_from_hash(raw: dict[str, str]) -> Pool | None:
    """The pool record (fields ``meta``/``spec``/``status`` as JSON; ``labels``/``gen``/``deleted``
    beside them as for sessions, when present). None for a missing or unreadable record."""
    if not raw or "meta" not in raw or "spec" not in raw:
        return None
    try:
        meta = json.loads(raw["meta"])
        if raw.get("labels"):
            meta["labels"] = json.loads(raw["labels"])
        if raw.get("gen"):
            meta["generation"] = int(raw["gen"])
        if raw.get("deleted"):
            meta["deletionTimestamp"] = raw["deleted"]
        status = json.loads(raw["status"]) if raw.get("status") else {}
        return Pool(
            metadata=Metadata.model_validate(meta),
            spec=PoolSpec.model_validate_json(raw["spec"]),
            status=PoolStatus.model_validate(status),
        )
    except ValueError:
        return None


class PoolClaims(StoreBase):
    """The controller's pool operations (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim = self._redis.register_script(_CLAIM_LUA)
        self._withdraw = self._redis.register_script(_WITHDRAW_LUA)
        self._status_if_exists = self._redis.register_script(_STATUS_LUA)

    # -- reads --------------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def all_pools(self) -> list[Pool]:
        """Every pool in the index (deleted ones too, until removed), by name."""
        names = [str(n) for n in await self._redis.zrange(keys.POOLS, 0, -1)]
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.pool(name))
            raws = await pipe.execute()
        return [p for raw in raws if (p := pool_from_hash(dict(raw))) is not None]

    @unavailable_on_redis_error
    async def pool_state(self, name: str) -> PoolState:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.pool_machines(name))
            pipe.smembers(keys.pool_ready(name))
            pipe.hgetall(keys.pool_claims(name))
            pipe.hgetall(keys.pool_booted(name))
            machines, ready, claims, booted = await pipe.execute()
        records = {
            mid: rec for mid, raw in dict(machines).items() if (rec := PoolMachineRecord.from_json(mid, raw))
        }
        return PoolState(
            records=records,
            ready=frozenset(str(m) for m in ready),
            claims={k: v for k, v in dict(claims).items() if not k.startswith(_FENCE_PREFIX)},
            booted={slot: at for slot, raw in dict(booted).items() if (at := _parse_time(raw)) is not None},
        )

    # -- records ------------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def put_pool_machine(self, pool: str, record: PoolMachineRecord) -> None:
        """Write a record (a new machine, or one adopted from Fly's list)."""
        await self._redis.hset(keys.pool_machines(pool), record.machine_id, record.to_json())

    @unavailable_on_redis_error
    async def mark_pool_machine_ready(self, pool: str, record: PoolMachineRecord) -> None:
        """The machine is parked: claimable from now on."""
        ready = replace(record, state="ready")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.pool_machines(pool), record.machine_id, ready.to_json())
            pipe.sadd(keys.pool_ready(pool), record.machine_id)
            await pipe.execute()

    @unavailable_on_redis_error
    async def withdraw_pool_machine(self, pool: str, machine_id: str) -> bool:
        """Take a ready machine out of the pool before destroying it; False if a claim won it."""
        result = await self._withdraw(
            keys=[keys.pool_machines(pool), keys.pool_ready(pool)], args=[machine_id]
        )
        return bool(result)

    @unavailable_on_redis_error
    async def forget_pool_machine(self, pool: str, machine_id: str, slot: str | None = None) -> None:
        """Drop a machine's record (destroyed, gone, or handed over to its session) and its slot's keys."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.pool_machines(pool), machine_id)
            pipe.srem(keys.pool_ready(pool), machine_id)
            if slot is not None:
                pipe.hdel(keys.pool_booted(pool), slot)
                pipe.delete(keys.pool_slot_token(pool, slot))
            await pipe.execute()

    # -- claims -------------------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def claim_pool_machine(
        self, pool: str, session_id: str, at: datetime, *, fence: tuple[str, int] | None = None
    ) -> ClaimResult:
        """Pop a ready machine of ``pool`` for ``session_id`` (or return the one it already holds).

        None when the pool has nothing ready; ``"fenced"`` when a newer holder of the session's
        shard exists (see the module docstring).
        """
        args: list[str] = [session_id, at.isoformat()]
        if fence is not None:
            fence_key, token = fence
            if await self._redis.get(fence_key) != str(token):
                return "fenced"
            args += [_FENCE_PREFIX + fence_key, str(token)]
        reply = await self._claim(
            keys=[keys.pool_machines(pool), keys.pool_ready(pool), keys.pool_claims(pool)], args=args
        )
        if reply == -2:
            return "fenced"
        if not reply:
            return None
        machine_id, raw = str(reply[0]), str(reply[1])
        record = PoolMachineRecord.from_json(machine_id, raw)
        return (machine_id, record) if record is not None else None

    @unavailable_on_redis_error
    async def finish_pool_claim(self, pool: str, session_id: str, machine_id: str, slot: str) -> None:
        """The session's side of the claim is written: the machine is the session's now, not the pool's."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.pool_claims(pool), session_id)
            pipe.hdel(keys.pool_machines(pool), machine_id)
            pipe.srem(keys.pool_ready(pool), machine_id)
            pipe.hdel(keys.pool_booted(pool), slot)
            await pipe.execute()

    @unavailable_on_redis_error
    async def drop_pool_claim(self, pool: str, session_id: str) -> None:
        """Forget a claim (its machine failed to resume, or its session is gone)."""
        await self._redis.hdel(keys.pool_claims(pool), session_id)

    # -- status and removal -------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def write_pool_status(self, name: str, status: PoolStatus) -> bool:
        """Write the controller-owned status; False if the pool record is gone."""
        return bool(await self._status_if_exists(keys=[keys.pool(name)], args=[status.model_dump_json()]))

    @unavailable_on_redis_error
    async def remove_pool(self, name: str, slots: Sequence[str] = ()) -> None:
        """Delete a drained, deleted pool: its record, its machine keys and its slots' tokens."""
        doomed = [
            keys.pool(name),
            keys.pool_machines(name),
            keys.pool_ready(name),
            keys.pool_claims(name),
            keys.pool_booted(name),
        ]
        for slot in slots:
            doomed += [keys.pool_slot_token(name, slot), keys.pool_assignment(name, slot)]
        await self._redis.delete(*doomed)
        await self._redis.zrem(keys.POOLS, name)
        # The index lives in another slot: a pool created again between the two writes above lost its
        # index entry to the ZREM. Put it back (the create wrote the record before indexing it).
        if await self._redis.exists(keys.pool(name)):
            await self._redis.zadd(keys.POOLS, {name: 0})


def _parse_time(raw: str) -> datetime | None:
    """An ISO timestamp or epoch seconds (whichever the gateway writes)."""
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        try:
            return datetime.fromtimestamp(float(raw), tz=UTC)
        except ValueError:
            return None
