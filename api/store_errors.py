"""The errors every way of reaching session state raises: the store (Redis) and the agent's channel (HTTP).

Kept apart from :mod:`api.store_base` so that code which must not load redis (the agent, which
reaches its state only through the control plane) can still raise and catch the same errors: the
agent's retry logic is written once against these, whatever the transport.
"""

from __future__ import annotations


class StoreUnavailable(RuntimeError):
    """The state could not be reached (Redis, or the control plane) or answered an error we cannot act on."""


class StoreAuthFailed(StoreUnavailable):
    """The credentials were refused (a disabled Redis user; a revoked or foreign session token)."""


class StoreBusy(StoreUnavailable):
    """Every connection of a pool stayed in use for the pool's whole wait: a real limit, per call."""


class StorePermissionDenied(RuntimeError):
    """The credentials are valid but may not touch this state (another session's, for an agent)."""
