"""The Fly client over real loopback HTTP (uvicorn): timeouts, refused connections, long polls.

``ASGITransport`` has no sockets, so what only a network can do (a response that never comes in
time, a refused connection) is tested here against the emulator served on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from controller.fly import FlyClient
from controller.fly_errors import AmbiguousCreate, Transient
from tests.controller.fly_harness import FlyHarness, closed_loopback_port, served_on_loopback, sleeper_config


async def test_create_timing_out_after_it_was_sent_is_ambiguous_and_never_resent(fly: FlyHarness) -> None:
    async with served_on_loopback(fly) as base_url:
        calls: Counter[tuple[str, str]] = Counter()
        client = FlyClient(
            fly.config(
                base_url=base_url,
                request_timeout=0.3,
                on_response=lambda action, status, seconds: calls.update([(action, status)]),
            )
        )
        try:
            await fly.set_faults(latency_ms=1000)
            with pytest.raises(AmbiguousCreate) as caught:
                await client.create_machine(
                    sleeper_config({"flyswarm_launch": "L-timeout"}), skip_launch=True
                )
            assert caught.value.status is None
            assert caught.value.metadata == {"flyswarm_launch": "L-timeout"}
            assert calls == Counter({("create", "timeout"): 1})
            # The emulator records a request when it finishes handling it (after its latency).
            for _ in range(200):
                if await fly.count("Machines_create"):
                    break
                await asyncio.sleep(0.02)
            assert await fly.count("Machines_create") == 1  # it reached the server once, never again
        finally:
            await client.aclose()


async def test_read_timeouts_on_reads_are_retried_then_surface_as_transient(fly: FlyHarness) -> None:
    async with served_on_loopback(fly) as base_url:
        calls: Counter[tuple[str, str]] = Counter()
        client = FlyClient(
            fly.config(
                base_url=base_url,
                request_timeout=0.2,
                call_deadline=1.0,
                on_response=lambda action, status, seconds: calls.update([(action, status)]),
            )
        )
        try:
            await fly.set_faults(latency_ms=2000)
            with pytest.raises(Transient):
                await client.list_machines()
            assert calls[("list", "timeout")] >= 2
        finally:
            await client.aclose()


async def test_wait_long_poll_outlasts_the_ordinary_request_timeout(fly: FlyHarness) -> None:
    async with served_on_loopback(fly) as base_url:
        client = FlyClient(fly.config(base_url=base_url, request_timeout=0.5))
        try:
            machine = await client.create_machine(sleeper_config(), skip_launch=True)
            with pytest.raises(Transient) as caught:
                await client.wait_machine(machine.id, "started", timeout=2, long_poll=2)
            # The emulator answered its own 408 after 2 s; our HTTP timeout did not cut it short.
            assert caught.value.status == 408
            assert await fly.count("Machines_wait", 408) == 1
        finally:
            await client.aclose()


async def test_refused_connections_are_retried_even_for_create_because_nothing_was_sent(
    fly: FlyHarness,
) -> None:
    calls: Counter[tuple[str, str]] = Counter()
    client = FlyClient(
        fly.config(
            base_url=f"http://127.0.0.1:{closed_loopback_port()}",
            call_deadline=0.5,
            on_response=lambda action, status, seconds: calls.update([(action, status)]),
        )
    )
    try:
        with pytest.raises(Transient) as caught:
            await client.create_machine(sleeper_config())
        assert not isinstance(caught.value, AmbiguousCreate)
        assert calls[("create", "connection_error")] >= 2
    finally:
        await client.aclose()
