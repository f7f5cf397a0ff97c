"""Error responses map to the type the caller must react to."""

from __future__ import annotations

import pytest

from controller.fly_errors import (
    AmbiguousCreate,
    Capacity,
    Conflict,
    FlyError,
    LeaseHeld,
    NotFound,
    Permanent,
    PreconditionFailed,
    RateLimited,
    Transient,
    error_for_status,
    parse_error_body,
)

LEASE_TEXT = (
    "aborted: machine ID m1 lease currently held by other@tokens.fly.io, expires at 2026-01-01T00:00:00Z"
)


@pytest.mark.parametrize(
    ("status", "message", "error_status", "expected", "transient"),
    [
        (404, "machine not found", None, NotFound, False),
        (409, "current version mismatch", None, Conflict, True),
        (409, LEASE_TEXT, None, LeaseHeld, True),
        (
            409,
            "aborted: could not reserve resource for machine: insufficient memory available",
            None,
            Capacity,
            True,
        ),
        (412, "unable to start machine from current state", None, PreconditionFailed, True),
        (412, "insufficient resources to create new machine with existing volume", None, Capacity, True),
        (422, "insufficient capacity", "insufficient_capacity", Capacity, True),
        (
            403,
            'organization "x" is using 2048 MB of memory in dfw which is over the allowed quota',
            None,
            Capacity,
            True,
        ),
        (403, "forbidden", None, Permanent, False),
        (429, "resource_exhausted: rate limit exceeded", None, RateLimited, True),
        (408, "deadline_exceeded", None, Transient, True),
        (500, "internal", None, Transient, True),
        (503, "unavailable: deploys to this host are temporarily disabled", None, Transient, True),
        (400, "invalid_argument", None, Permanent, False),
        (401, "unauthorized", None, Permanent, False),
        (422, "unknown region", None, Permanent, False),
    ],
)
def test_status_maps_to_error_type(
    status: int, message: str, error_status: str | None, expected: type[FlyError], transient: bool
) -> None:
    err = error_for_status(status, message, error_status=error_status, fly_request_id="req-1", action="start")
    assert type(err) is expected
    assert err.transient is transient
    assert err.status == status
    assert "req-1" in str(err)


def test_rate_limited_is_retried_by_the_client_as_transient() -> None:
    assert issubclass(RateLimited, Transient)


def test_ambiguous_create_is_not_a_transient_so_generic_retries_skip_it() -> None:
    err = AmbiguousCreate("maybe", metadata={"flyswarm_launch": "L1"}, status=408)
    assert not isinstance(err, Transient)
    assert err.transient is True
    assert err.metadata == {"flyswarm_launch": "L1"}


@pytest.mark.parametrize(
    ("body", "message", "error_status"),
    [
        ('{"error": "machine not found"}', "machine not found", None),
        ('{"error": "full", "status": "insufficient_capacity"}', "full", "insufficient_capacity"),
        ('{"message": "from fly-go"}', "from fly-go", None),
        ('{"status": "error", "message": "lease not found", "code": "not_found"}', "lease not found", None),
        ("<html>bad gateway</html>", "<html>bad gateway</html>", None),
        ("", "(empty body)", None),
    ],
)
def test_error_bodies_are_read_in_every_form_fly_uses(
    body: str, message: str, error_status: str | None
) -> None:
    assert parse_error_body(body) == (message, error_status)


def test_long_bodies_are_truncated() -> None:
    message, _ = parse_error_body("x" * 10_000)
    assert len(message) == 500
