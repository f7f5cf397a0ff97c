"""Who is calling, and what they may do: the one definition shared by auth, routes and the audit trail.

A request's :class:`Principal` is decided once, at the edge (:mod:`api.middleware`), and put into
the ASGI scope's state under ``"principal"``; routes and the audit trail read it from there with
:func:`principal_of`. Namespaces (``metadata.namespace``, default :data:`DEFAULT_NAMESPACE`) are the
unit of access: a token is bound to one or more namespaces, each with one :class:`Role`; a
cluster-admin token (every token in ``API_TOKENS``) may do anything, including managing namespaces.

Roles are cumulative, as in the issue and Kubernetes' default ``view``/``edit``/``admin``:

* ``read``: get, list, events, streams, artifacts and files;
* ``write``: ``read`` plus create, apply, delete and send;
* ``admin``: ``write`` plus the namespace's quotas, tokens and audit trail.

Outside its scope a caller gets 404 for reads (no existence leak) and 403 for writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

DEFAULT_NAMESPACE = "default"
#: A namespace name is a DNS label (RFC 1123), as in Kubernetes: it appears in paths, keys and Fly tags.
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
NAMESPACE_MAX_LENGTH = 63


class Role(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.READ: 1, Role.WRITE: 2, Role.ADMIN: 3}


@dataclass(frozen=True)
class Principal:
    """The caller: a token's id (never the token), its bindings, and whether it is a cluster admin."""

    token_id: str
    cluster_admin: bool = False
    roles: Mapping[str, Role] = field(default_factory=dict)

    def can(self, namespace: str, needed: Role) -> bool:
        if self.cluster_admin:
            return True
        role = self.roles.get(namespace)
        return role is not None and role.allows(needed)

    def readable_namespaces(self) -> frozenset[str] | None:
        """The namespaces this caller may read; ``None`` means every namespace (cluster admin)."""
        if self.cluster_admin:
            return None
        return frozenset(self.roles)


#: The principal of an API with no tokens configured (loopback-only development): may do anything.
OPEN_PRINCIPAL = Principal(token_id="anonymous", cluster_admin=True)


def principal_of(scope_state: Mapping[str, Any]) -> Principal:
    """The request's principal, as the edge decided it (the open principal when auth is off)."""
    found = scope_state.get("principal")
    return found if isinstance(found, Principal) else OPEN_PRINCIPAL
