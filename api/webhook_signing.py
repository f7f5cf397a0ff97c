"""Standard Webhooks signatures (https://www.standardwebhooks.com), both sides.

A delivery carries three headers: ``webhook-id`` (the message id, the same on every retry of one
event, so receivers drop duplicates by it), ``webhook-timestamp`` (Unix seconds of this attempt)
and ``webhook-signature``: ``v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`` where
``key`` is the bytes of the ``whsec_`` secret's base64 part. :func:`verify` is what a receiver
runs (the README shows the same in a dozen lines of standard library).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from api.notify_models import secret_key

#: A receiver refuses timestamps further than this from its clock (replay protection).
TOLERANCE_SECONDS = 300


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(secret: str, received: dict[str, str], body: bytes, *, now: int) -> bool:
    """Whether ``received`` headers sign ``body`` with ``secret`` within the tolerance."""
    try:
        msg_id, stamp = received["webhook-id"], int(received["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(now - stamp) > TOLERANCE_SECONDS:
        return False
    expected = signature(secret, msg_id, stamp, body).split(",", 1)[1]
    offered = [part.split(",", 1)[1] for part in received.get("webhook-signature", "").split() if "," in part]
    return any(hmac.compare_digest(expected, sig) for sig in offered)
