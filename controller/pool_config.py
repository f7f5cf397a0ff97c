"""The machine a pool keeps warm, and the session environment handed to it at claim time.

A pool machine's config is readable by every reader of the Fly app, and the machine is created
before anyone knows which session it will serve: it carries nothing session-specific. Its env holds
the gateway's URL, the pool slot token (``FLYSWARM_POOL_TOKEN``: it opens only the slot's
``/agent/v1/pool/...`` routes, and the agent moves it out of its environment at once) and the
deployment's agent pacing; its metadata holds the pool, the slot and the template digest.

The session's env (its id, launch id, its spec's variables) travels with the assignment through
the gateway (:meth:`api.store_pool_handoff.PoolHandoff.assign_pool_slot`), and its token too; the
Fly config never sees them.
"""

from __future__ import annotations

from typing import Any

from api.models import Session
from api.pool_models import Pool
from controller.fly_types import MachineConfig, go_duration
from controller.machine_config import agent_env, deployment_env, refuse_controller_secrets
from controller.observed import pool_machine_tags
from controller.pool_plan import template_digest
from controller.settings import ControllerSettings


def pool_machine_name(pool: str, slot: str) -> str:
    """``pool-<pool>-<slot>``: unique per slot, so a create sent twice gets Fly's 409, not a twin."""
    return f"pool-{pool}-{slot}"[:63]


def pool_machine_config_for(
    pool: Pool, settings: ControllerSettings, *, slot: str, pool_token: str, image: str | None = None
) -> dict[str, Any]:
    """The CreateMachineRequest body of one pool slot's machine (see the module docstring)."""
    template = pool.spec.template
    # The deployment's pacing and gateway, exactly as a fresh session's machine gets them.
    env = deployment_env(settings)
    env["FLYSWARM_POOL"] = pool.name
    env["FLYSWARM_POOL_SLOT"] = slot
    env["FLYSWARM_POOL_TOKEN"] = pool_token
    config: dict[str, Any] = {
        "image": template.image or image or settings.fly_agent_image,
        "guest": {
            "cpu_kind": template.guest.cpuKind,
            "cpus": template.guest.cpus,
            "memory_mb": template.guest.memoryMb,
        },
        "env": env,
        "metadata": pool_machine_tags(pool.name, slot, template_digest(pool.spec)),
        # Not auto_destroy: the machine waits parked; the session plan destroys it when done.
        "auto_destroy": False,
        "restart": {"policy": "no"},
        "stop_config": {"signal": "SIGTERM", "timeout": go_duration(settings.stop_grace_seconds)},
    }
    body = {"name": pool_machine_name(pool.name, slot), "region": template.region, "config": config}
    refuse_controller_secrets(body, settings)
    return body


def pool_machine_config(
    pool: Pool, settings: ControllerSettings, *, slot: str, pool_token: str, image: str | None = None
) -> MachineConfig:
    body = pool_machine_config_for(pool, settings, slot=slot, pool_token=pool_token, image=image)
    return MachineConfig.model_validate(body["config"])


def session_env(session: Session, settings: ControllerSettings, *, launch_id: str) -> dict[str, str]:
    """What a claimed machine's agent sets for its session: a fresh machine's env, minus the token
    (handed over beside it) and minus what the pool machine already has."""
    env = agent_env(session, settings, launch_id=launch_id, session_token="")
    del env["FLYSWARM_SESSION_TOKEN"]
    return env
