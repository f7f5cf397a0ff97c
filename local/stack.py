"""The kind-like local stack behind ``make up`` / ``make down`` / ``make status`` / ``make logs``.

``up`` starts, on loopback and in the background, each component as a detached process (its own
session and process group, so it outlives the ``flyswarm up`` that started it):

==========  ====================================  ============================================
component   what runs                             ready when
==========  ====================================  ============================================
redis       ``redis-server`` (AOF under redis/)   it answers PING (cluster: ``cluster_state:ok``)
emulator    ``flyswarm emulator`` (Fly Machines)  ``GET /_admin/health`` answers 200
model       ``flyswarm model`` (scripted model)   ``GET /_requests`` answers 200
gateway     ``flyswarm gateway`` (model gateway)  ``GET /readyz`` answers 200
api         ``flyswarm api``                      ``GET /readyz`` answers 200
controller  ``flyswarm controller``               ``GET /readyz`` (health port) answers 200
git         ``python -m local.git_server --demo``  its port accepts connections
==========  ====================================  ============================================

The ``git`` component serves, over git's smart-HTTP protocol, the bare repositories under
``git/`` - first of all ``demo.git``, created on first start - as a Git host would: the
repository ``manifests/examples/fix-bug.yaml`` clones (through the gateway's git proxy) and fixes.

The agents' ``ANTHROPIC_BASE_URL`` is the gateway, which alone holds an Anthropic key: the agent
app's secrets carry no key at all (each machine gets its session's token from the controller).
The scripted model runs only without ``ANTHROPIC_API_KEY``: the gateway then forwards to it with a
local upstream key (``secrets/model-api-key``) that the model requires, so it answers 401 to
anything that did not come through the gateway. With a key, the gateway forwards to the real API
with it (as ``deploy.sh`` makes it a secret of the control plane). Secret values reach the
components through their environment, never a command line.

State lives under one directory (``FLYSWARM_LOCAL_DIR``, default ``./.local``)::

    logs/<component>.log   each component's stdout and stderr
    pids/<component>.pid   the pid of what ``up`` started (the leader of its process group)
    redis/                 Redis data (append-only file): sessions survive restarts
    redis-cluster/         the same for FLYSWARM_REDIS_MODE=cluster: node-<port>/ (AOF, nodes.conf)
    machines/              the emulator's per-machine work dirs (machine.log inside each)
    sessions/              the agents' per-session work dirs
    secrets/fly-api-token  the local FLY_API_TOKEN the emulator accepts (mode 0600)
    git/                   the local Git host's bare repositories (demo.git)

``up`` is idempotent: a component counts as running only when its recorded pid is alive *and*
its port answers; anything else is (re)started, so killing any one component by hand and running
``make up`` again heals the stack (Redis reloads its AOF: no session is lost). A port answered by a
process ``up`` did not start is an error naming the variable that moves it.

``down`` stops, in reverse order, exactly the recorded process groups (SIGTERM, then SIGKILL after
``FLYSWARM_DOWN_TIMEOUT``), then makes sure no machine survives: it kills the machine process
groups the emulator listed before it stopped, and every process that carries this stack's marker
variable ``FLYSWARM_LOCAL_STACK=<state dir>`` (set on every component and, as an app secret, on
every machine and so on every agent, CLI and tool they spawn).

Settings (environment; defaults in parentheses):

``FLYSWARM_LOCAL_DIR`` (``.local``) state directory; ``FLYSWARM_REDIS_PORT`` (6399);
``FLYSWARM_REDIS_MODE`` (``single``; ``cluster``: a Redis Cluster of 3 masters and 3 replicas on
``FLYSWARM_REDIS_PORT`` and the five ports after it, run by ``python -m local.redis_cluster``, which
forms it on first start and restarts a node that dies; every component gets a ``redis+cluster://``
URL);
``FLYSWARM_EMULATOR_PORT`` (4280, the port of Fly's internal Machines API);
``FLYSWARM_MODEL_PORT`` (4281); ``FLYSWARM_GIT_PORT`` (4282, the demo Git host);
``FLYSWARM_GATEWAY_PORT`` (8082, the model gateway); ``PORT``
(8080, the API); ``FLYSWARM_CONTROLLER_PORT`` (9090, the controller's health and metrics);
``FLY_APP_NAME`` (``flyswarm-agents``); ``FLYSWARM_FLY_APPS`` (unset: ``FLY_APP_NAME`` alone; e.g.
``flyswarm-agents,flyswarm-agents-b`` spreads creates over two emulated apps, each with its own
create limit when the emulator's rate limits are on); ``FLY_AGENT_IMAGE``
(``flyswarm-agent``); ``ANTHROPIC_API_KEY`` (unset: scripted model); ``FLYSWARM_UP_TIMEOUT`` (60 s,
how long ``up`` waits for readiness); ``FLYSWARM_DOWN_TIMEOUT`` (15 s, SIGTERM→SIGKILL grace);
``FLYSWARM_WEBHOOK_ALLOW_PRIVATE`` (``1``: webhooks may target loopback receivers).
Every other variable in the environment of ``up`` passes through to the components (for example
``FLYSWARM_RESYNC_SECONDS`` or ``LOG_LEVEL``), except Fly and Anthropic credentials, which go only
where they belong.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from controller.fly_apps import parse_app_list
from local.redis_cluster import cluster_ok, cluster_summary
from local.redis_server import redis_answers, redis_args

Echo = Callable[[str], None]

HOST = "127.0.0.1"
MARKER_ENV = "FLYSWARM_LOCAL_STACK"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Credentials that must reach only the component that needs them.
_CREDENTIAL_ENV = (
    "FLY_API_TOKEN",
    "FLY_ACCESS_TOKEN",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "API_TOKENS",
)
# The order components start in; down goes the other way.
ORDER = ("redis", "emulator", "model", "gateway", "api", "controller", "git")
# Components of one stage start together; a stage starts when the previous one is ready.
STAGES = (("redis",), ("emulator", "model", "git"), ("gateway", "api", "controller"))


class StackError(RuntimeError):
    """The stack cannot be brought to the requested state; the message says why and what to do."""


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StackError(f"{name}={raw!r} is not a port number") from None
    if not 0 < value < 65536:
        raise StackError(f"{name}={value} is not a port number (1-65535)")
    return value


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw.rstrip("s"))
    except ValueError:
        raise StackError(f"{name}={raw!r} is not a number of seconds") from None


def _redis_mode(env: Mapping[str, str]) -> str:
    mode = (env.get("FLYSWARM_REDIS_MODE") or "single").strip().lower()
    if mode not in ("single", "cluster"):
        raise StackError(f"FLYSWARM_REDIS_MODE={mode!r} is not one of: single, cluster")
    return mode


def _fly_apps(env: Mapping[str, str]) -> tuple[str, ...]:
    try:
        return parse_app_list(env.get("FLYSWARM_FLY_APPS") or "")
    except ValueError as err:
        raise StackError(f"FLYSWARM_FLY_APPS: {err}") from None


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which ports it uses (see the module docstring)."""

    root: Path
    redis_port: int = 6399
    redis_mode: str = "single"
    emulator_port: int = 4280
    model_port: int = 4281
    git_port: int = 4282
    gateway_port: int = 8082
    api_port: int = 8080
    controller_port: int = 9090
    app_name: str = "flyswarm-agents"
    #: The agent apps creates spread over (``FLYSWARM_FLY_APPS``); empty: ``app_name`` alone.
    fly_apps: tuple[str, ...] = ()
    agent_image: str = "flyswarm-agent"
    anthropic_api_key: str | None = field(default=None, repr=False)
    ready_timeout: float = 60.0
    stop_timeout: float = 15.0
    python: str = sys.executable

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackConfig:
        env = os.environ if env is None else env
        root = Path(env.get("FLYSWARM_LOCAL_DIR") or ".local").expanduser().resolve()
        return cls(
            root=root,
            redis_port=_env_int(env, "FLYSWARM_REDIS_PORT", 6399),
            redis_mode=_redis_mode(env),
            emulator_port=_env_int(env, "FLYSWARM_EMULATOR_PORT", 4280),
            model_port=_env_int(env, "FLYSWARM_MODEL_PORT", 4281),
            git_port=_env_int(env, "FLYSWARM_GIT_PORT", 4282),
            gateway_port=_env_int(env, "FLYSWARM_GATEWAY_PORT", 8082),
            api_port=_env_int(env, "PORT", 8080),
            controller_port=_env_int(env, "FLYSWARM_CONTROLLER_PORT", 9090),
            app_name=env.get("FLY_APP_NAME") or "flyswarm-agents",
            fly_apps=_fly_apps(env),
            agent_image=env.get("FLY_AGENT_IMAGE") or "flyswarm-agent",
            anthropic_api_key=env.get("ANTHROPIC_API_KEY") or None,
            ready_timeout=_env_float(env, "FLYSWARM_UP_TIMEOUT", 60.0),
            stop_timeout=_env_float(env, "FLYSWARM_DOWN_TIMEOUT", 15.0),
        )

    @property
    def agent_apps(self) -> tuple[str, ...]:
        return self.fly_apps or (self.app_name,)

    @property
    def redis_url(self) -> str:
        if self.redis_mode == "cluster":
            return f"redis+cluster://{HOST}:{self.redis_port}"
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def emulator_url(self) -> str:
        return f"http://{HOST}:{self.emulator_port}"

    @property
    def model_url(self) -> str:
        return f"http://{HOST}:{self.model_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    @property
    def controller_url(self) -> str:
        return f"http://{HOST}:{self.controller_port}"

    @property
    def uses_model(self) -> bool:
        return self.anthropic_api_key is None

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"


@dataclass(frozen=True)
class Component:
    """One process of the stack: how to start it and how to tell that it is ready."""

    name: str
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    url: str
    probe: Callable[[], bool] = field(repr=False, compare=False)
    # A substring of the command line that identifies the process (guards against pid reuse).
    marker: str
    port_variable: str


@dataclass(frozen=True)
class ComponentState:
    name: str
    pid: int | None
    port: int
    alive: bool
    answering: bool
    url: str

    @property
    def running(self) -> bool:
        return self.alive and self.answering

    @property
    def label(self) -> str:
        if self.running:
            return "up"
        if self.alive:
            return "not ready"
        return "down"


# -- processes ---------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _port_open(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_ok(url: str, token: str | None = None) -> bool:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=1.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid`` (components start in their own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _pid_alive(pgid) or bool(_group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return members
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        # fields: state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def marked_processes(root: Path) -> list[int]:
    """Pids of live processes whose environment carries ``FLYSWARM_LOCAL_STACK=<root>``."""
    needle = f"{MARKER_ENV}={root}".encode()
    me = {os.getpid(), os.getppid()}
    found: list[int] = []
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) in me:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(item == needle for item in environ.split(b"\0")) and _pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return sorted(found)
    # No /proc (macOS): `ps e` prints each process's environment after its command.
    try:
        out = subprocess.run(["ps", "axeww", "-o", "pid=,command="], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    for line in out.stdout.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) not in me:
            if (needle + b" ") in parts[1] + b" ":
                found.append(int(parts[0]))
    return sorted(found)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            data = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# -- the stack ---------------------------------------------------------------------------------------


class Stack:
    """The local stack under one state directory."""

    def __init__(self, config: StackConfig, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)

    @classmethod
    def from_env(cls) -> Stack:
        return cls(StackConfig.from_env())

    # -- layout -------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.config.root

    def _ensure_dirs(self) -> None:
        for sub in ("logs", "pids", "redis", "machines", "sessions", "secrets"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "secrets", 0o700)

    def fly_token(self) -> str:
        """The local FLY_API_TOKEN (generated once, kept so restarts of single components agree)."""
        return self._local_secret("fly-api-token", "local-")

    def model_key(self) -> str:
        """The gateway's upstream key for the scripted model (the model refuses any other)."""
        return self._local_secret("model-api-key", "sk-ant-local-")

    def _local_secret(self, name: str, prefix: str) -> str:
        path = self.root / "secrets" / name
        with contextlib.suppress(FileNotFoundError):
            token = path.read_text().strip()
            if token:
                return token
        path.parent.mkdir(parents=True, exist_ok=True)
        token = prefix + secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One ``up``/``down`` at a time per state directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "stack.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- component definitions ----------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in _CREDENTIAL_ENV}
        paths = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env[MARKER_ENV] = str(self.root)
        # Local receivers of webhooks listen on loopback: the SSRF guard lets them through here
        # (README "Webhooks"; FLYSWARM_WEBHOOK_ALLOW_PRIVATE=0 in the environment keeps it on).
        env.setdefault("FLYSWARM_WEBHOOK_ALLOW_PRIVATE", "1")
        return env

    def agent_secrets(self) -> dict[str, str]:
        """The emulated agent app's secrets: what every local machine (agent) gets."""
        values = {
            MARKER_ENV: str(self.root),
            "FLYSWARM_WORK_ROOT": str(self.root / "sessions"),
            # No Anthropic key and no Redis address: each machine gets its session's token and the
            # gateway's address (FLYSWARM_CONTROL_URL, set by the controller), the CLI's base URL.
        }
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # The CLI refuses bypassPermissions as root unless told it runs in a sandbox; a local
            # machine is a subprocess of whoever runs `make up` (the Fly image runs as non-root).
            values["IS_SANDBOX"] = "1"
        return values

    def components(self) -> dict[str, Component]:
        cfg = self.config
        base = self._base_env()
        token = self.fly_token()
        py = cfg.python
        comps: dict[str, Component] = {}
        if cfg.redis_mode == "cluster":
            comps["redis"] = Component(
                name="redis",
                port=cfg.redis_port,
                argv=(py, "-m", "local.redis_cluster"),
                env={
                    **base,
                    "FLYSWARM_REDIS_DIR": str(self.root / "redis-cluster"),
                    "FLYSWARM_REDIS_PORT": str(cfg.redis_port),
                },
                url=cfg.redis_url,
                probe=lambda: cluster_ok(cfg.redis_port),
                marker="local.redis_cluster",
                port_variable="FLYSWARM_REDIS_PORT",
            )
        else:
            comps["redis"] = Component(
                name="redis",
                port=cfg.redis_port,
                argv=tuple(redis_args(port=cfg.redis_port, data_dir=self.root / "redis", appendonly=True)),
                env=base,
                url=cfg.redis_url,
                probe=lambda: redis_answers(cfg.redis_port, timeout=0.5),
                marker="redis-server",
                port_variable="FLYSWARM_REDIS_PORT",
            )
        emulator_env = {
            **base,
            "FLYSWARM_EMULATOR_API_TOKEN": token,
            "FLYSWARM_EMULATOR_SECRETS": json.dumps(dict.fromkeys(cfg.agent_apps, self.agent_secrets())),
        }
        comps["emulator"] = Component(
            name="emulator",
            port=cfg.emulator_port,
            argv=(
                py,
                "-m",
                "cli",
                "emulator",
                "--host",
                HOST,
                "--port",
                str(cfg.emulator_port),
                "--work-root",
                str(self.root / "machines"),
            ),
            env=emulator_env,
            url=cfg.emulator_url,
            probe=lambda: _http_ok(f"{cfg.emulator_url}/_admin/health", token),
            marker="cli emulator",
            port_variable="FLYSWARM_EMULATOR_PORT",
        )
        if cfg.uses_model:
            comps["model"] = Component(
                name="model",
                port=cfg.model_port,
                argv=(py, "-m", "cli", "model", "--host", HOST, "--port", str(cfg.model_port)),
                env={**base, "FLYSWARM_MODEL_API_KEY": self.model_key()},
                url=cfg.model_url,
                probe=lambda: _http_ok(f"{cfg.model_url}/_requests"),
                marker="cli model",
                port_variable="FLYSWARM_MODEL_PORT",
            )
        gateway_env = {
            **base,
            "REDIS_URL": cfg.redis_url,
            "FLYSWARM_GATEWAY_HOST": HOST,
            "FLYSWARM_GATEWAY_PORT": str(cfg.gateway_port),
        }
        if cfg.uses_model:
            gateway_env["ANTHROPIC_API_KEY"] = self.model_key()
            gateway_env["FLYSWARM_GATEWAY_UPSTREAM_URL"] = cfg.model_url
        else:
            assert cfg.anthropic_api_key is not None
            gateway_env["ANTHROPIC_API_KEY"] = cfg.anthropic_api_key
        comps["gateway"] = Component(
            name="gateway",
            port=cfg.gateway_port,
            argv=(py, "-m", "cli", "gateway"),
            env=gateway_env,
            url=cfg.gateway_url,
            probe=lambda: _http_ok(f"{cfg.gateway_url}/readyz"),
            marker="cli gateway",
            port_variable="FLYSWARM_GATEWAY_PORT",
        )
        api_env = {**base, "PORT": str(cfg.api_port), "HOST": HOST, "REDIS_URL": cfg.redis_url}
        if self.environ.get("API_TOKENS"):
            api_env["API_TOKENS"] = self.environ["API_TOKENS"]
        comps["api"] = Component(
            name="api",
            port=cfg.api_port,
            argv=(py, "-m", "cli", "api"),
            env=api_env,
            url=cfg.api_url,
            probe=lambda: _http_ok(f"{cfg.api_url}/readyz"),
            marker="cli api",
            port_variable="PORT",
        )
        comps["controller"] = Component(
            name="controller",
            port=cfg.controller_port,
            argv=(py, "-m", "cli", "controller"),
            env={
                **base,
                "REDIS_URL": cfg.redis_url,
                "FLY_API_HOSTNAME": cfg.emulator_url,
                "FLY_API_TOKEN": token,
                "FLY_APP_NAME": cfg.app_name,
                "FLYSWARM_FLY_APPS": ",".join(cfg.agent_apps),
                "FLY_AGENT_IMAGE": cfg.agent_image,
                "FLYSWARM_CONTROLLER_HOST": HOST,
                "FLYSWARM_CONTROLLER_PORT": str(cfg.controller_port),
                # Every machine's FLYSWARM_CONTROL_URL: model traffic and its session's state.
                "FLYSWARM_AGENT_GATEWAY_URL": cfg.gateway_url,
            },
            url=cfg.controller_url,
            probe=lambda: _http_ok(f"{cfg.controller_url}/readyz"),
            marker="cli controller",
            port_variable="FLYSWARM_CONTROLLER_PORT",
        )
        git_argv = ("--root", str(self.root / "git"), "--host", HOST, "--port", str(cfg.git_port), "--demo")
        comps["git"] = Component(
            name="git",
            port=cfg.git_port,
            argv=(py, "-m", "local.git_server", *git_argv),
            env=base,
            url=f"http://{HOST}:{cfg.git_port}/demo.git",
            probe=lambda: _port_open(cfg.git_port),
            marker="local.git_server",
            port_variable="FLYSWARM_GIT_PORT",
        )
        return comps

    # -- inspection ---------------------------------------------------------------------------------

    def recorded_pid(self, name: str) -> int | None:
        try:
            text = self.config.pid_path(name).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _ours(self, component: Component, pid: int | None) -> bool:
        return pid is not None and _pid_alive(pid) and component.marker in _cmdline(pid)

    def state(self, component: Component) -> ComponentState:
        pid = self.recorded_pid(component.name)
        alive = self._ours(component, pid)
        return ComponentState(
            name=component.name,
            pid=pid if alive else None,
            port=component.port,
            alive=alive,
            answering=component.probe(),
            url=component.url,
        )

    # -- up -----------------------------------------------------------------------------------------

    def _start(self, component: Component) -> int:
        log_path = self.config.log_path(component.name)
        with open(log_path, "ab") as log:
            log.write(
                f"\n--- flyswarm up: starting {component.name} at {time.strftime('%F %T')} ---\n".encode()
            )
            log.flush()
            process = subprocess.Popen(
                list(component.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(component.env),
                cwd=str(Path.cwd()),
                start_new_session=True,
                close_fds=True,
            )
        # The component outlives us: forget the Popen without a "still running" warning.
        process.returncode = 0
        self.config.pid_path(component.name).write_text(f"{process.pid}\n")
        return process.pid

    def _wait_ready(self, components: Sequence[Component], pids: Mapping[str, int]) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        waiting = list(components)
        while waiting:
            for component in list(waiting):
                pid = pids.get(component.name)
                if pid is not None and not _pid_alive(pid):
                    log = self.config.log_path(component.name)
                    raise StackError(
                        f"{component.name} exited during start-up; the end of {log}:\n{_tail(log)}"
                    )
                if component.probe():
                    waiting.remove(component)
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in waiting)
                hints = "\n".join(f"  {c.name}: see {self.config.log_path(c.name)}" for c in waiting)
                raise StackError(
                    f"not ready after {self.config.ready_timeout:.0f}s: {names} "
                    f"(FLYSWARM_UP_TIMEOUT raises the limit)\n{hints}"
                )
            time.sleep(0.1)

    def _sync_secrets(self) -> None:
        """Make the running emulator's app secrets match this environment (a key set or unset since)."""
        cfg = self.config
        token = self.fly_token()
        headers = {"authorization": f"Bearer {token}"}
        desired = self.agent_secrets()
        with httpx.Client(base_url=cfg.emulator_url, headers=headers, timeout=5.0) as http:
            for app in cfg.agent_apps:
                http.put(f"/_admin/secrets/{app}", json=desired).raise_for_status()
                names = http.get(f"/_admin/secrets/{app}").json().get("names", [])
                for name in names:
                    if name not in desired:
                        http.delete(f"/_admin/secrets/{app}/{name}").raise_for_status()

    def up(self, echo: Echo = print) -> dict[str, ComponentState]:
        """Start whatever is not running; wait until everything is ready; print where things are."""
        with self._locked():
            self._ensure_dirs()
            components = self.components()
            outcome: dict[str, str] = {}
            for stage in STAGES:
                to_wait: list[Component] = []
                pids: dict[str, int] = {}
                for name in stage:
                    component = components.get(name)
                    if component is None:
                        continue
                    pid = self.recorded_pid(name)
                    ours = self._ours(component, pid)
                    if ours and component.probe():
                        outcome[name] = "already running"
                        continue
                    if ours and pid is not None:
                        # Alive but not answering: give it the start-up time, else replace it.
                        try:
                            self._wait_ready([component], {name: pid})
                            outcome[name] = "already running"
                            continue
                        except StackError:
                            self._stop_pid(pid)
                            outcome[name] = "restarted (was not answering)"
                    elif _port_open(component.port):
                        raise StackError(
                            f"port {component.port} ({name}) is in use by a process `flyswarm up` did not "
                            f"start; stop it or move {name} with {component.port_variable}=<port>"
                        )
                    else:
                        outcome[name] = "restarted" if pid is not None else "started"
                    pids[name] = self._start(component)
                    to_wait.append(component)
                self._wait_ready(to_wait, pids)
                if "emulator" in stage:
                    self._sync_secrets()
            # Everything, not only what was started: a restarted Redis can make the others unready
            # for a moment, and `up` promises a ready stack.
            self._wait_ready(list(components.values()), {})
            if not self.config.uses_model:
                outcome["model"] = "not used (ANTHROPIC_API_KEY is set: the gateway forwards to the real API)"
                model_pid = self.recorded_pid("model")
                if model_pid is not None and _pid_alive(model_pid) and "cli model" in _cmdline(model_pid):
                    self._stop_pid(model_pid)
                self.config.pid_path("model").unlink(missing_ok=True)
            states = {name: self.state(c) for name, c in components.items()}
        self._print_up(echo, components, states, outcome)
        return states

    def _print_up(
        self,
        echo: Echo,
        components: Mapping[str, Component],
        states: Mapping[str, ComponentState],
        outcome: Mapping[str, str],
    ) -> None:
        cfg = self.config
        echo(f"flyswarm local stack ({self.root})")
        for name in ORDER:
            if name not in components:
                echo(f"  {name:<11} {outcome.get(name, 'not used')}")
                continue
            st = states[name]
            pid = f"pid {st.pid}" if st.pid else "pid -"
            echo(f"  {name:<11} {outcome.get(name, ''):<16} {pid:<11} {st.url}")
        echo("")
        echo(f"API:       {cfg.api_url}   (health {cfg.api_url}/health, docs {cfg.api_url}/docs)")
        echo(f"Metrics:   {cfg.controller_url}/metrics (controller), {cfg.api_url}/metrics (API)")
        echo(f"Logs:      {self.root / 'logs'}/<component>.log   (make logs)")
        echo(f"Machines:  {self.root / 'machines'}/<machine>/machine.log")
        echo("")
        echo("Next:")
        if cfg.api_port != 8080:
            echo(f"  export FLYSWARM_URL={cfg.api_url}")
        echo("  flyswarm apply -f manifests/examples/task.yaml")
        echo("  flyswarm wait hello-task --for=phase=Succeeded")
        echo("  flyswarm describe session hello-task")
        echo("  make down      # stop everything")

    # -- down ---------------------------------------------------------------------------------------

    def _stop_pid(self, pid: int) -> bool:
        """SIGTERM the process group, wait, then SIGKILL it. True when it is gone."""
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return True
            time.sleep(0.05)
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def machine_pids(self) -> list[int]:
        """Main-process pids of the emulator's machines (empty when the emulator does not answer)."""
        token = self.fly_token()
        try:
            response = httpx.get(
                f"{self.config.emulator_url}/_admin/machines",
                headers={"authorization": f"Bearer {token}"},
                timeout=2.0,
            )
            machines = response.json() if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            return []
        return [int(m["pid"]) for m in machines if isinstance(m, dict) and isinstance(m.get("pid"), int)]

    def down(self, echo: Echo = print) -> list[int]:
        """Stop what ``up`` started and every machine; returns the pids that were still alive after."""
        with self._locked():
            components = self.components() if self.root.exists() else {}
            machine_groups = self.machine_pids() if components else []
            stopped_any = False
            for name in reversed(ORDER):
                pid = self.recorded_pid(name)
                path = self.config.pid_path(name)
                component = components.get(name)
                if pid is None:
                    path.unlink(missing_ok=True)
                    continue
                marker = component.marker if component else f"cli {name}"
                if _pid_alive(pid) and marker in _cmdline(pid):
                    gone = self._stop_pid(pid)
                    stopped_any = True
                    echo(
                        f"  {name:<11} stopped (pid {pid})"
                        if gone
                        else f"  {name:<11} could not be stopped (pid {pid})"
                    )
                else:
                    echo(f"  {name:<11} was not running")
                path.unlink(missing_ok=True)
            # Machines: the emulator kills them on shutdown; kill what it listed and anything marked.
            leftovers = {p for p in machine_groups if _group_alive(p)}
            leftovers.update(marked_processes(self.root) if self.root.exists() else [])
            for pid in leftovers:
                if pid in machine_groups:
                    _signal_group(pid, signal.SIGKILL)
                else:
                    _kill(pid)
            deadline = time.monotonic() + 5.0
            survivors = sorted(p for p in leftovers if _pid_alive(p))
            while survivors and time.monotonic() < deadline:
                time.sleep(0.05)
                survivors = [p for p in survivors if _pid_alive(p)]
            killed = len(leftovers) - len(survivors)
            if killed:
                echo(f"  machines    {killed} leftover process(es) killed")
            if not stopped_any and not killed:
                echo("nothing was running")
            else:
                echo(
                    "flyswarm local stack stopped (data kept in "
                    + str(self.root)
                    + "; `make clean` removes it)"
                )
            if survivors:
                raise StackError(f"processes still alive after down: {survivors}")
            return survivors

    # -- status -------------------------------------------------------------------------------------

    def sessions_by_phase(self) -> Counter[str] | None:
        from flyswarm import Client, FlyswarmError, Retry, shown_phase

        token = self.environ.get("FLYSWARM_TOKEN") or None
        try:
            with Client(self.config.api_url, token, timeout=5.0, retry=Retry(retries=0)) as client:
                return Counter(shown_phase(s).value for s in client.list(page_size=500))
        except FlyswarmError:
            return None

    def machines_by_state(self) -> Counter[str] | None:
        token = self.fly_token()
        states: Counter[str] = Counter()
        for app in self.config.agent_apps:
            try:
                response = httpx.get(
                    f"{self.config.emulator_url}/v1/apps/{app}/machines",
                    headers={"authorization": f"Bearer {token}"},
                    timeout=5.0,
                )
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            states.update(str(m.get("state", "?")) for m in response.json() if isinstance(m, dict))
        return states

    def status(self, echo: Echo = print) -> bool:
        """Print each component, sessions by phase and machines by state; True when all are up."""
        components = self.components()
        echo(f"flyswarm local stack ({self.root})")
        echo(f"  {'COMPONENT':<11} {'STATE':<10} {'PID':<8} {'PORT':<6} URL")
        healthy = True
        for name in ORDER:
            if name not in components:
                echo(f"  {name:<11} {'not used':<10} {'-':<8} {'-':<6} (ANTHROPIC_API_KEY is set)")
                continue
            st = self.state(components[name])
            healthy = healthy and st.running
            echo(f"  {name:<11} {st.label:<10} {st.pid or '-'!s:<8} {st.port:<6} {st.url}")
        if self.config.redis_mode == "cluster":
            summary = cluster_summary(self.config.redis_port)
            echo("")
            echo(f"Redis:     {summary or '(the cluster does not answer)'}")
        phases = self.sessions_by_phase()
        echo("")
        if phases is None:
            echo("Sessions:  (the API does not answer)")
        else:
            summary = ", ".join(f"{phase} {count}" for phase, count in sorted(phases.items())) or "none"
            echo(f"Sessions:  {sum(phases.values())} ({summary})")
        machines = self.machines_by_state()
        if machines is None:
            echo("Machines:  (the emulator does not answer)")
        else:
            summary = ", ".join(f"{state} {count}" for state, count in sorted(machines.items())) or "none"
            echo(f"Machines:  {sum(machines.values())} ({summary})")
        return healthy

    def api_ready(self) -> bool:
        return _http_ok(f"{self.config.api_url}/readyz")

    # -- logs ---------------------------------------------------------------------------------------

    def follow_logs(
        self,
        echo: Echo = print,
        history: int = 10,
        poll: float = 0.25,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """``tail -F`` of every component log, each line prefixed with its component.

        Runs until Ctrl-C (or until ``stop()`` answers True). A log that is truncated or replaced
        is read again from its start.
        """
        paths = {name: self.config.log_path(name) for name in ORDER}
        positions: dict[str, tuple[int, int]] = {}  # name -> (inode, offset)
        width = max(len(n) for n in paths)
        for name, path in paths.items():
            if not path.exists():
                continue
            for line in _tail(path, history).splitlines():
                echo(f"{name:<{width}} | {line}")
            stat = path.stat()
            positions[name] = (stat.st_ino, stat.st_size)
        if not positions:
            echo(f"no logs yet in {self.root / 'logs'} (run `make up`)")
        while stop is None or not stop():
            for name, path in paths.items():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                inode, offset = positions.get(name, (stat.st_ino, 0))
                if inode != stat.st_ino or stat.st_size < offset:
                    offset = 0  # rotated or truncated: start over
                if stat.st_size > offset:
                    with open(path, "rb") as fh:
                        fh.seek(offset)
                        data = fh.read()
                    # Only complete lines; a partial last line waits for its end.
                    complete = data[: data.rfind(b"\n") + 1]
                    for line in complete.decode(errors="replace").splitlines():
                        echo(f"{name:<{width}} | {line}")
                    offset += len(complete)
                positions[name] = (stat.st_ino, offset)
            time.sleep(poll)
