"""The Fly machine a session runs on, built from its spec by pure functions.

:func:`machine_config_for` returns the JSON body of Fly's CreateMachineRequest (``name``,
``region``, ``config``); :class:`MachineConfigBuilder` wraps it for the executor, which wants the
typed ``MachineConfig``. Nothing here does I/O, so tests call the builder and compare values.

What a machine gets, and why:

- **image**: the spec's ``machine.image``, else the deployment's (``FLY_AGENT_IMAGE``).
- **env**: the session id, the launch id, the control plane's gateway as agents reach it
  (``FLYSWARM_CONTROL_URL``: the CLI's ``ANTHROPIC_BASE_URL`` and the agent channel), the session
  token minted for this launch (``FLYSWARM_SESSION_TOKEN``: the machine's one credential, which the
  agent moves out of its environment at once), heartbeat pacing, the stop timeout, then the spec's
  env. No Redis address or credential, no Anthropic key, no Fly token: :func:`machine_config_for`
  refuses to build a body that contains a controller secret or any Redis URL.
- **metadata**: ``flyswarm_managed=true``, ``flyswarm_session``, ``flyswarm_launch`` - the identity
  the controller finds its machines by (create is not idempotent on Fly).
- **restart policy ``no``**: the controller decides restarts (backoff, maxRetries, heartbeats);
  Fly restarting behind its back would make a crash look like a healthy machine.
- **auto_destroy** for task sessions: a finished task's machine removes itself.
- **stop_config** SIGTERM with the stop grace, so the agent flushes events and its transcript.
- **mounts** (``spec.persistence``): the session's volume at :data:`VOLUME_MOUNT_PATH`, and
  ``FLYSWARM_VOLUME_ROOT`` pointing there (the agent's work root; it wins over
  ``FLYSWARM_WORK_ROOT``), so the agent's work dir and home live on the volume and survive stops
  and replacements.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlsplit

from api.models import Session
from controller.fly_types import MachineConfig, go_duration
from controller.observed import machine_tags
from controller.settings import ControllerSettings

#: Fly machine names are DNS-label-like; keep them within 63 characters.
MAX_NAME_LENGTH = 63
#: Where a session's volume is mounted; the agent's work root when it has one.
VOLUME_MOUNT_PATH = "/data"
#: The agent must exit this much before Fly's SIGKILL (the stop_config timeout).
_STOP_MARGIN_SECONDS = 2.0


def machine_name(session_id: str, launch_id: str) -> str:
    """``<session>-<launch>``, unique per launch; a long session id is shortened with a hash."""
    name = f"{session_id}-{launch_id}"
    if len(name) <= MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:8]
    room = MAX_NAME_LENGTH - len(launch_id) - len(digest) - 2
    return f"{session_id[: max(room, 1)].rstrip('-')}-{digest}-{launch_id}"[:MAX_NAME_LENGTH]


def agent_env(
    session: Session, settings: ControllerSettings, *, launch_id: str, session_token: str
) -> dict[str, str]:
    """The machine's environment: the spec's variables, then ours (ours win; the API forbids clashes).

    ``session_token`` is the launch's per-session token: the one credential a machine holds. It opens
    nothing but the gateway (``FLYSWARM_CONTROL_URL``: the model proxy and the agent's channel to its
    own state), for this session, while it lives. No Redis address, no Anthropic key.
    """
    return {
        **session.spec.machine.env,
        "FLYSWARM_SESSION_ID": session.id,
        "FLYSWARM_LAUNCH_ID": launch_id,
        "FLYSWARM_SESSION_TOKEN": session_token,
        **deployment_env(settings),
    }


def deployment_env(settings: ControllerSettings) -> dict[str, str]:
    """What every agent machine gets whatever it serves: the gateway's URL and the pacing."""
    ttl = max(int(settings.heartbeat_ttl_seconds), 3)
    stop_timeout = max(settings.stop_grace_seconds - _STOP_MARGIN_SECONDS, 1.0)
    return {
        "FLYSWARM_CONTROL_URL": settings.agent_gateway_url,
        "FLYSWARM_HEARTBEAT_TTL_SECONDS": str(ttl),
        "FLYSWARM_HEARTBEAT_INTERVAL_SECONDS": _number(ttl / 3),
        "FLYSWARM_STOP_TIMEOUT_SECONDS": _number(stop_timeout),
        "FLYSWARM_LOG_LEVEL": settings.log_level,
    }


def machine_config_for(
    session: Session,
    settings: ControllerSettings,
    *,
    launch_id: str,
    session_token: str,
    image: str | None = None,
    region: str | None = None,
    volume_id: str | None = None,
) -> dict[str, Any]:
    """The CreateMachineRequest body (``name``, ``region``, ``config``) for one launch of ``session``.

    ``session_token`` is the token minted for this launch (``ControllerStore.mint_session_token``);
    ``image`` overrides ``FLY_AGENT_IMAGE`` (the spec's image still wins); ``region`` overrides the
    spec's (e.g. a fallback region after a capacity error); ``volume_id`` is mounted as the
    agent's work root (``spec.persistence``). Raises ValueError if a controller
    secret or a Redis address would reach the machine.
    """
    spec = session.spec
    guest = spec.machine.guest
    config: dict[str, Any] = {
        "image": spec.machine.image or image or settings.fly_agent_image,
        "guest": {"cpu_kind": guest.cpuKind, "cpus": guest.cpus, "memory_mb": guest.memoryMb},
        "env": agent_env(session, settings, launch_id=launch_id, session_token=session_token),
        "metadata": machine_tags(session.id, launch_id),
        "auto_destroy": spec.mode == "task",
        "restart": {"policy": "no"},
        "stop_config": {"signal": "SIGTERM", "timeout": go_duration(settings.stop_grace_seconds)},
    }
    if volume_id is not None:
        config["mounts"] = [{"volume": volume_id, "path": VOLUME_MOUNT_PATH}]
        # Not FLYSWARM_WORK_ROOT: an app secret of that name would win over the machine's env.
        config["env"]["FLYSWARM_VOLUME_ROOT"] = VOLUME_MOUNT_PATH
    body = {
        "name": machine_name(session.id, launch_id),
        "region": region or spec.machine.region or settings.default_region,
        "config": config,
    }
    refuse_controller_secrets(body, settings)
    return body


class MachineConfigBuilder:
    """The executor's ``ConfigBuilder``: the typed ``MachineConfig`` of a launch."""

    def __init__(self, settings: ControllerSettings, *, image: str | None = None) -> None:
        self.settings = settings
        self.image = image

    def __call__(
        self,
        session: Session,
        *,
        launch_id: str,
        region: str,
        session_token: str,
        volume_id: str | None = None,
    ) -> MachineConfig:
        body = machine_config_for(
            session,
            self.settings,
            launch_id=launch_id,
            session_token=session_token,
            image=self.image,
            region=region,
            volume_id=volume_id,
        )
        return MachineConfig.model_validate(body["config"])


def controller_secrets(settings: ControllerSettings) -> list[str]:
    """Values that must never reach a machine: the Fly token and the controller's Redis password(s)."""
    found: list[str] = []
    if settings.fly_api_token is not None:
        found.append(settings.fly_api_token.get_secret_value())
    for url in (settings.redis_url,):
        if url is not None:
            password = urlsplit(url.get_secret_value()).password
            if password:
                found.append(password)
    return [s for s in found if len(s) >= 4]


def refuse_controller_secrets(body: dict[str, Any], settings: ControllerSettings) -> None:
    text = json.dumps(body)
    for secret in controller_secrets(settings):
        if secret in text:
            raise ValueError("refusing to build a machine config that contains a controller secret")
    if "redis://" in text or "rediss://" in text:
        raise ValueError("refusing to build a machine config that contains a Redis address")


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"
