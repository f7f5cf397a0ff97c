"""Pool slot tokens: the one credential an unclaimed pool machine holds.

A pool machine is created before anyone knows which session it will serve, so it cannot hold a
session token. It holds a *slot token* instead, reading ``fpt_<pool>_<slot>_<secret>``: the pool and
the slot are recoverable from the token (verifying it is one read of that slot's key, no global
index), the secret is 32 random bytes in hex. Pool names and slots are DNS labels (never ``_``), so
the split is unambiguous; the ``fpt`` prefix never parses as a session token (``fst``), so a slot
token opens no session route and a session token opens no pool route.

What it opens: ``/agent/v1/pool/booted`` and ``/agent/v1/pool/assignment`` for its own slot, and
nothing else - no session's state, no model traffic. The control plane stores only the SHA-256 (hex)
at :func:`api.keys.pool_slot_token`; the controller mints one per slot before creating the machine
and revokes it when the slot's machine is claimed (the session token takes over), destroyed or its
pool removed. The gateway compares digests in constant time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from api.models import DNS_LABEL_RE
from api.session_token import digest_matches as digest_matches
from api.session_token import token_digest

PREFIX = "fpt"
_SECRET_BYTES = 32


@dataclass(frozen=True)
class PoolToken:
    """A parsed slot token. ``value`` is the secret whole: never log it (``repr`` hides it)."""

    pool: str
    slot: str
    value: str

    def __repr__(self) -> str:
        return f"PoolToken(pool={self.pool!r}, slot={self.slot!r}, value='***')"

    __str__ = __repr__

    @property
    def digest(self) -> str:
        return token_digest(self.value)


def mint(pool: str, slot: str) -> PoolToken:
    """A fresh random token for ``slot`` of ``pool`` (the caller stores its digest)."""
    if not DNS_LABEL_RE.match(pool):
        raise ValueError(f"{pool!r} is not a pool name")
    if not DNS_LABEL_RE.match(slot):
        raise ValueError(f"{slot!r} is not a pool slot (a DNS label)")
    return PoolToken(pool, slot, f"{PREFIX}_{pool}_{slot}_{secrets.token_hex(_SECRET_BYTES)}")


def parse(value: str) -> PoolToken | None:
    """The token ``value`` stands for, or None when it is not shaped like a slot token."""
    parts = value.split("_")
    if len(parts) != 4 or parts[0] != PREFIX:
        return None
    pool, slot, secret = parts[1], parts[2], parts[3]
    if not DNS_LABEL_RE.match(pool) or not DNS_LABEL_RE.match(slot):
        return None
    if len(secret) != 2 * _SECRET_BYTES or any(c not in "0123456789abcdef" for c in secret):
        return None
    return PoolToken(pool, slot, value)


def looks_like_pool_token(value: str) -> bool:
    """True for anything that starts like a slot token (logs and tool output must never show one)."""
    return value.startswith(PREFIX + "_")
