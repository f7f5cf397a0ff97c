"""Per-session tokens: the one credential an agent's machine holds.

A token reads ``fst_<session id>_<secret>``: the session id is recoverable from the token itself,
so verifying it is one read of that session's keys (no global token index, which would need a
cross-slot lookup and would be one more thing for a removal to forget). The secret is 32 random
bytes in hex (no ``_``, so the split is unambiguous; session ids are DNS labels, never ``_``).

The control plane stores only the token's SHA-256 (hex) in a per-session key
(:func:`api.keys.session_token`): a Redis dump or a ``MONITOR`` shows no usable token. The
controller mints one per launch (a new mint replaces the old, so a replaced machine's token stops
working) and revokes it when the session finishes or is removed; the gateway verifies it with a
constant-time comparison of digests.

The token is useless outside the control plane (it opens nothing but the gateway) and after its
session ends (revoked, and refused for a finished or deleted session even before revocation).
:func:`check` is the whole verdict (401/403 and why), shared by every service that accepts tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from api.models import DNS_LABEL_RE, TERMINAL_PHASES, Session

PREFIX = "fst"
_SECRET_BYTES = 32


@dataclass(frozen=True)
class SessionToken:
    """A parsed token. ``value`` is the secret whole: never log it (``repr`` hides it)."""

    session_id: str
    value: str

    def __repr__(self) -> str:
        return f"SessionToken(session_id={self.session_id!r}, value='***')"

    __str__ = __repr__

    @property
    def digest(self) -> str:
        return token_digest(self.value)


def mint(session_id: str) -> SessionToken:
    """A fresh random token for ``session_id`` (the caller stores its digest)."""
    if not DNS_LABEL_RE.match(session_id):
        raise ValueError(f"{session_id!r} is not a session id")
    return SessionToken(session_id, f"{PREFIX}_{session_id}_{secrets.token_hex(_SECRET_BYTES)}")


def parse(value: str) -> SessionToken | None:
    """The token ``value`` stands for, or None when it is not shaped like one."""
    parts = value.split("_")
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    session_id, secret = parts[1], parts[2]
    if not DNS_LABEL_RE.match(session_id) or len(secret) != 2 * _SECRET_BYTES:
        return None
    if any(c not in "0123456789abcdef" for c in secret):
        return None
    return SessionToken(session_id, value)


def token_digest(value: str) -> str:
    """SHA-256 (hex) of a token: what the control plane stores."""
    return hashlib.sha256(value.encode()).hexdigest()


def digest_matches(value: str, stored_digest: str | None) -> bool:
    """Whether ``value`` hashes to ``stored_digest``, compared in constant time."""
    if not stored_digest:
        return False
    return hmac.compare_digest(token_digest(value).encode(), stored_digest.encode())


def looks_like_session_token(value: str) -> bool:
    """True for anything that starts like a token (the scripted model refuses those outright)."""
    return value.startswith(PREFIX + "_")


@dataclass(frozen=True)
class Refusal:
    """Why a token may not act: ``status`` 401 (not a valid token) or 403 (valid, but not here/now)."""

    status: int
    reason: str
    message: str


def check(
    value: str | None,
    stored_digest: str | None,
    session: Session | None,
    *,
    for_session: str | None = None,
) -> SessionToken | Refusal:
    """Verify a presented token against its session's stored digest and record.

    ``stored_digest`` and ``session`` are what the store holds for the session the token names.
    ``for_session``, when the caller acts on a session named elsewhere (a URL path), must be that
    same session. Missing, malformed, forged, replaced or revoked → 401; a valid token of a deleted
    or finished session, or of another session than ``for_session`` → 403.
    """
    if not value:
        return Refusal(401, "unauthenticated", "a session token is required")
    token = parse(value)
    if token is None:
        return Refusal(401, "unauthenticated", "not a flyswarm session token")
    if not digest_matches(token.value, stored_digest):
        return Refusal(401, "unauthenticated", "unknown or revoked session token")
    if session is None or session.deleted:
        return Refusal(403, "deleted", f"session {token.session_id} was deleted")
    if session.effective_phase() in TERMINAL_PHASES:
        return Refusal(403, "finished", f"session {token.session_id} is finished")
    if for_session is not None and for_session != token.session_id:
        return Refusal(403, "other_session", f"this token belongs to session {token.session_id}")
    return token
