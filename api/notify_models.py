"""What a session tells its receivers: the events, ``spec.notify`` targets, signing secrets, URL rules.

Kept apart from :mod:`api.webhook_models` (the Webhook resource) because the Session's own spec
(:mod:`api.models`) carries ``notify`` and must not import the resource module that imports it.
See :mod:`api.webhook_models` for the whole design.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

WEBHOOK_KIND: Literal["Webhook"] = "Webhook"

#: Serialization context key that keeps secrets in a dump (the store's, nobody else's).
REVEAL_SECRETS = "reveal_secrets"
SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64
MAX_URL_LENGTH = 2048
MAX_NOTIFY_TARGETS = 8
MISSING_SECRET = (
    "give a whsec_ secret or a secretRef (a Webhook's name) "
    "(secrets are write-only: a GET does not show them, so send it again on apply)"
)


class WebhookEvent(StrEnum):
    PHASE_CHANGED = "session.phase_changed"
    FINISHED = "session.finished"
    DEADLINE_APPROACHING = "session.deadline_approaching"
    BUDGET_WARNING = "session.budget_warning"


ALL_EVENTS = tuple(WebhookEvent)


def generate_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_`` secret (the bytes the base64 stands for)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def check_secret(value: str) -> str:
    if not value.startswith(SECRET_PREFIX):
        raise ValueError("must be whsec_ followed by base64 (Standard Webhooks)")
    try:
        key = secret_key(value)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not valid base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(f"must hold {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes")
    return value


def check_url_shape(value: str) -> str:
    """Scheme, host and no credentials. Where it points is the admission's and the worker's to check
    (:mod:`api.webhook_targets`: they know whether private targets are allowed)."""
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (use the signing secret)")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


def check_events(value: list[WebhookEvent]) -> list[WebhookEvent]:
    if not value:
        raise ValueError("name at least one event")
    if len(set(value)) != len(value):
        raise ValueError("names an event twice")
    return value


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NotifyTarget(_Input):
    """One receiver of a session's events (``spec.notify[i]``)."""

    url: str
    events: list[WebhookEvent] = Field(default_factory=lambda: list(ALL_EVENTS))
    secret: str | None = None
    #: The name of a Webhook resource whose signing secret signs these deliveries instead.
    secretRef: str | None = Field(default=None, max_length=63)
    #: Output only (the secret is write-only); accepted and ignored on input.
    secretSet: bool | None = Field(default=None, exclude=True)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url_shape(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return check_events(value)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return None if value is None else check_secret(value)

    @model_validator(mode="after")
    def _one_secret(self) -> NotifyTarget:
        # The redacted form (``secretSet`` and no secret: what a GET or the agent reads) is valid,
        # so every reader can parse a spec; the API's admission still requires the secret itself.
        if self.secret is not None and self.secretRef is not None:
            raise ValueError("secret: give a whsec_ secret or a secretRef, not both")
        if self.secret is None and self.secretRef is None and not self.secretSet:
            raise ValueError(f"secret: {MISSING_SECRET}")
        return self

    @property
    def signable(self) -> bool:
        """Whether this target carries what signs its deliveries (not merely its redacted form)."""
        return self.secret is not None or self.secretRef is not None

    @model_serializer(mode="wrap")
    def _without_secret(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not (info.context or {}).get(REVEAL_SECRETS):
            data.pop("secret", None)
            data["secretSet"] = self.secret is not None
        return data


def check_notify(value: list[NotifyTarget]) -> list[NotifyTarget]:
    if len(value) > MAX_NOTIFY_TARGETS:
        raise ValueError(f"at most {MAX_NOTIFY_TARGETS} targets")
    return value


#: Deliveries are grouped by target: ``webhook/<name>`` or ``session/<id>/<index of spec.notify>``.
WEBHOOK_TARGET_PREFIX = "webhook/"


def webhook_target(name: str) -> str:
    """The target name of a Webhook resource (its deliveries list is keyed by it)."""
    return f"{WEBHOOK_TARGET_PREFIX}{name}"


def notify_target(session_id: str, index: int) -> str:
    """The target name of ``spec.notify[index]`` of one session."""
    return f"session/{session_id}/{index}"
