"""Errors as Fly answers them: an HTTP status and ``{"error": "<grpc-ish code>: <text>", "status": ...}``."""

from __future__ import annotations

from typing import Any


class FlyError(Exception):
    """An API error as Fly answers it: an HTTP status and ``{"error": ..., "status": ...}``."""

    def __init__(self, http_status: int, error: str, status: str | None = None) -> None:
        super().__init__(error)
        self.http_status = http_status
        self.error = error
        self.status = status

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error}
        if self.status is not None:
            body["status"] = self.status
        return body


def not_found() -> FlyError:
    return FlyError(404, "machine not found")


def invalid(message: str) -> FlyError:
    return FlyError(400, f"invalid_argument: {message}")


def unable(action: str) -> FlyError:
    return FlyError(412, f"unable to {action} machine from current state")
