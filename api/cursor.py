"""The opaque list cursor the API hands out (sessions and pools page the same way).

A cursor is the last name of the page it ends, base64url-encoded behind a version tag: a client can
only give back what it was given, and a cursor from another server version is refused (400
``cursor``) rather than misread.
"""

from __future__ import annotations

import base64
import binascii


class InvalidCursor(ValueError):
    """A pagination cursor that this store did not hand out."""


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("cursor is not one this server handed out") from None
    if not raw.startswith("v1:") or len(raw) > 80:
        raise InvalidCursor("cursor is not one this server handed out")
    return raw[3:]
