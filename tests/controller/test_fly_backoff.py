"""Backoff between retries: exponential, capped, jittered, and never sooner than Retry-After."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from controller.fly import backoff_delay, retry_after_seconds


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (8, 5.0), (30, 5.0)]:
        delays = [backoff_delay(attempt, 0.2, 5.0, rng) for _ in range(50)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered, so concurrent retries spread out


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(1)
    assert backoff_delay(1, 0.2, 5.0, rng, retry_after=7.0) == 7.0
    assert backoff_delay(6, 0.2, 5.0, rng, retry_after=0.0) >= 2.5


@pytest.mark.parametrize(
    ("header", "seconds"), [("3", 3.0), ("0.5", 0.5), ("-2", 0.0), (None, None), ("soon", None)]
)
def test_retry_after_seconds_form(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_http_date_form() -> None:
    header = email.utils.formatdate(time.time() + 30, usegmt=True)
    value = retry_after_seconds(header)
    assert value is not None and 25 <= value <= 31
