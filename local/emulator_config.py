"""What Fly keeps of a machine config, and the limits it enforces on it.

Fly decodes a config into its Go struct: fields it does not know are dropped (a client sending
fly.toml names such as ``auto_stop_machines`` gets them silently ignored, not echoed back), and the
guest is checked before anything is scheduled. The emulator does the same, so a client cannot come
to rely on an answer Fly would never give. The field sets are the spec's schemas
(``fly.MachineConfig`` and the nested objects the emulator interprets); a contract test holds them
to shared/fly/openapi.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from local.emulator_errors import invalid

#: ``fly.MachineConfig`` properties: anything else in a config is dropped.
CONFIG_FIELDS = frozenset(
    {
        "auto_destroy",
        "cache_drive",
        "checks",
        "containers",
        "disable_machine_autostart",
        "dns",
        "env",
        "files",
        "guest",
        "image",
        "init",
        "metadata",
        "metrics",
        "mounts",
        "processes",
        "restart",
        "rootfs",
        "schedule",
        "services",
        "size",
        "spot",
        "standbys",
        "statics",
        "stop_config",
    }
)
#: Nested objects whose unknown fields are dropped too (schema name -> its properties).
NESTED_FIELDS: Mapping[str, frozenset[str]] = {
    "guest": frozenset(
        {
            "cpu_kind",
            "cpus",
            "gpu_kind",
            "gpus",
            "host_dedication_id",
            "kernel_args",
            "max_memory_mb",
            "memory_mb",
            "persist_rootfs",
            "required_host_features",
        }
    ),
    "init": frozenset({"cmd", "entrypoint", "exec", "kernel_args", "swap_size_mb", "tty"}),
    "restart": frozenset({"max_retries", "policy"}),
    "stop_config": frozenset({"signal", "timeout"}),
}
#: The schema each nested key names in the spec (for the contract test).
NESTED_SCHEMAS: Mapping[str, str] = {
    "guest": "fly.MachineGuest",
    "init": "fly.MachineInit",
    "restart": "fly.MachineRestart",
    "stop_config": "fly.StopConfig",
}

CPU_KINDS = frozenset({"shared", "performance"})
#: Fly's CPU counts per machine (``fly platform vm-sizes``).
CPU_COUNTS = frozenset({1, 2, 4, 8, 16})
MIN_MEMORY_MB = 256
MEMORY_STEP_MB = 256
DEFAULT_GUEST: Mapping[str, Any] = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}


def known_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config as Fly stores it: unknown fields dropped, at the top and in the nested objects above."""
    config = {k: v for k, v in raw.items() if k in CONFIG_FIELDS}
    for key, allowed in NESTED_FIELDS.items():
        value = config.get(key)
        if isinstance(value, dict):
            config[key] = {k: v for k, v in value.items() if k in allowed}
    return config


def check_guest(guest: Any) -> dict[str, Any]:
    """The guest with Fly's defaults filled in; 400 naming the field for what Fly would refuse."""
    if guest is None:
        return dict(DEFAULT_GUEST)
    if not isinstance(guest, dict):
        raise invalid("config.guest must be an object")
    out = {**DEFAULT_GUEST, **guest}
    kind = out["cpu_kind"]
    if kind not in CPU_KINDS:
        raise invalid(f"config.guest.cpu_kind: must be one of {sorted(CPU_KINDS)}, got {kind!r}")
    cpus = out["cpus"]
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus not in CPU_COUNTS:
        raise invalid(f"config.guest.cpus: must be one of {sorted(CPU_COUNTS)}, got {cpus!r}")
    memory = out["memory_mb"]
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < MIN_MEMORY_MB:
        raise invalid(f"config.guest.memory_mb: must be at least {MIN_MEMORY_MB}, got {memory!r}")
    if memory % MEMORY_STEP_MB:
        raise invalid(f"config.guest.memory_mb: must be a multiple of {MEMORY_STEP_MB}, got {memory}")
    return out


def check_mounts(mounts: Any) -> list[dict[str, Any]] | None:
    """The mounts' shape as Fly checks it: objects naming a volume and an absolute path, at most one
    (a Fly machine mounts one volume). Whether the volume exists is the volume registry's check."""
    if mounts is None:
        return None
    if not isinstance(mounts, list) or not all(isinstance(m, dict) for m in mounts):
        raise invalid("config.mounts must be a list of objects")
    if len(mounts) > 1:
        raise invalid("config.mounts: a machine can mount at most one volume")
    for i, mount in enumerate(mounts):
        if not mount.get("volume"):
            raise invalid(f"config.mounts[{i}].volume is required")
        path = mount.get("path")
        if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
            raise invalid(f"config.mounts[{i}].path: must be an absolute path other than /")
    return mounts or None
