"""The SSRF guard: which addresses a webhook may be delivered to.

A webhook URL is chosen by a user, and the control plane sends requests to it from inside the
private network that also holds Redis, the Fly API token's reach and the cloud's metadata service.
So a target must be a *global* address: private (RFC 1918, IPv6 ULA such as Fly's ``fdaa::/16``),
loopback, link-local (``169.254.169.254``, the metadata service), shared (CGNAT), multicast,
reserved and unspecified addresses are refused, IPv4-mapped IPv6 checked as the IPv4 it maps.

A host name is resolved and **every** address it has is checked, at admission (the API) and again
right before each delivery (the worker connects to the checked address itself), so a name that
changes its answer after admission (DNS rebinding) is still caught. One setting,
``FLYSWARM_WEBHOOK_ALLOW_PRIVATE``, lifts the rule (the local stack sets it: its receivers are on
loopback).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.ip_network("100.64.0.0/10")
RESOLVE_TIMEOUT_SECONDS = 5.0


class TargetRefused(ValueError):
    """The target's host is, or resolves to, an address webhooks may not reach."""


def literal_address(host: str) -> Address | None:
    """``host`` as an IP address when it is one (``[::1]`` brackets already stripped), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def forbidden_reason(address: Address) -> str | None:
    """Why ``address`` may not be a webhook target (``'loopback'``, ``'private'``...), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("private", address.is_private),
        ("shared", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


async def resolve(host: str, port: int, *, allow_private: bool) -> list[Address]:
    """Every address of ``host``, each checked; raises :class:`TargetRefused` naming the first bad one.

    A name that does not resolve raises :class:`OSError` (the delivery is retried later).
    """
    literal = literal_address(host)
    if literal is not None:
        found = [literal]
    else:
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS
        )
        found = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not allow_private:
        for address in found:
            reason = forbidden_reason(address)
            if reason is not None:
                raise TargetRefused(f"{host} resolves to {address}, a {reason} address")
    return found
