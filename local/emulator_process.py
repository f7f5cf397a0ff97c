"""A machine's main process: how the emulator resolves, spawns, signals and reaps it.

A Fly Machine is a VM whose init runs one main process. Here it is a local subprocess:

* the command is ``config.init.exec`` when set, else ``init.entrypoint`` + ``init.cmd`` (the image's
  command standing in for a missing entrypoint), else the image's command from the image map;
* it runs in its own session (so its own process group): SIGKILL, SIGSTOP and SIGCONT go to the
  whole group, like a VM being killed, frozen or thawed, while the stop signal and ``/signal`` go to
  the main process only, as Fly's init forwards them to the main process;
* on Linux it also gets ``PR_SET_PDEATHSIG=SIGKILL``, a last line of defence against orphans if the
  emulator itself is SIGKILLed (the normal path kills every group on shutdown);
* its env is built from scratch (a few host variables, the machine env, app secrets, ``FLY_*``), so
  nothing of the host leaks in: a real machine never sees the operator's ``FLY_API_TOKEN``;
* stdout and stderr go to ``machine.log`` in the machine's private work dir, which is also its
  cwd and HOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOG_NAME = "machine.log"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

_PR_SET_PDEATHSIG = 1
_SIG_SETMASK = 2  # sigprocmask's how (Linux)
_SIG_DFL = 0


class LaunchError(RuntimeError):
    """The machine's main process could not be started (unknown image, missing binary, bad env)."""


def _pdeathsig_hook() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        sigprocmask = libc.sigprocmask
        set_handler = libc.signal
    except (OSError, AttributeError):
        return None
    no_signals = ctypes.create_string_buffer(128)  # a sigset_t with no signal in it
    reset = [int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)]

    def hook() -> None:
        # Runs in the child between fork and exec: only plain libc calls, nothing that allocates.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Fly's init starts a machine's process with no signal blocked or ignored. The emulator's
        # own process may have some (an event loop blocks signals around its work; a runner may
        # ignore SIGINT), and both survive exec: a stop's SIGINT would then never arrive.
        sigprocmask(_SIG_SETMASK, no_signals, None)
        for signum in reset:
            set_handler(signum, _SIG_DFL)

    return hook


_PREEXEC = _pdeathsig_hook()


def image_command(image: str, images: Mapping[str, Sequence[str]]) -> list[str] | None:
    """The command an image runs, looked up by exact name, then without tag/digest, then by basename.

    ``registry.fly.io/flyswarm-agent:v3`` and ``flyswarm-agent@sha256:...`` both map like
    ``flyswarm-agent``.
    """
    if image in images:
        return list(images[image])
    bare = image.split("@", 1)[0]
    last = bare.rsplit("/", 1)[-1]
    if ":" in last:
        bare = bare[: len(bare) - len(last)] + last.split(":", 1)[0]
        last = last.split(":", 1)[0]
    for candidate in (bare, last):
        if candidate in images:
            return list(images[candidate])
    return None


def resolve_command(
    image: str,
    exec_: Sequence[str] | None,
    entrypoint: Sequence[str] | None,
    cmd: Sequence[str] | None,
    images: Mapping[str, Sequence[str]],
) -> list[str]:
    """argv of the main process, the way Fly's init chooses it.

    With an explicit command (exec, entrypoint or cmd) any image is accepted: the emulator has no
    registry to pull from. Without one, the image must be in the image map, as an image Fly cannot
    pull cannot launch.
    """
    if exec_:
        return list(exec_)
    mapped = image_command(image, images)
    if entrypoint or cmd:
        head = list(entrypoint) if entrypoint else (mapped or [])
        argv = head + list(cmd or [])
        if argv:
            return argv
    if mapped:
        return mapped
    raise LaunchError(f"failed to pull image {image!r}: not found in the emulator's image map")


def build_env(
    *,
    host_env: Mapping[str, str],
    inherit: Sequence[str],
    home: Path,
    config_env: Mapping[str, str],
    secrets: Mapping[str, str],
    fly_env: Mapping[str, str],
) -> dict[str, str]:
    """The machine's environment: a minimal base, then config env, then secrets, then FLY_*."""
    env: dict[str, str] = {name: host_env[name] for name in inherit if name in host_env}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env["HOME"] = str(home)
    env.update(config_env)
    # Fly gives secrets precedence over the machine's plain env.
    env.update(secrets)
    env.update(fly_env)
    return env


def check_allowed(argv0: str, env: Mapping[str, str], allowed: Sequence[str] | None) -> None:
    if allowed is None:
        return
    resolved = shutil.which(argv0, path=env.get("PATH")) or argv0
    allowed_set = set(allowed)
    if argv0 in allowed_set or resolved in allowed_set or os.path.basename(resolved) in allowed_set:
        return
    raise LaunchError(f"executable {argv0!r} is not allowed by this emulator")


@dataclass
class ExitStatus:
    """How a main process ended."""

    exit_code: int
    signal: int  # -1 when not killed by a signal, as flyd reports it

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode < 0:
            return cls(exit_code=128 - returncode, signal=-returncode)
        return cls(exit_code=returncode, signal=-1)


class MachineProcess:
    """One running main process (the leader of its own process group)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        # Set by the emulator before it signals the process on purpose (stop, restart, destroy),
        # so the exit is not mistaken for a crash.
        self.expected_exit = False
        self.status: ExitStatus | None = None
        self._done = asyncio.Event()

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> MachineProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = cwd / LOG_NAME
        try:
            with open(log_path, "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=str(cwd),
                    env=dict(env),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_PREEXEC,
                )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise LaunchError(f"failed to launch VM: {type(exc).__name__}: {exc}") from exc
        return cls(proc, log_path)

    async def wait(self) -> ExitStatus:
        """Reap the main process, then kill whatever is left of its group (the VM is gone)."""
        if self.status is None:
            returncode = await self.proc.wait()
            self.kill_group(signal.SIGKILL)
            self.status = ExitStatus.from_returncode(returncode)
            self._done.set()
        return self.status

    async def exited(self) -> ExitStatus:
        await self._done.wait()
        assert self.status is not None
        return self.status

    @property
    def running(self) -> bool:
        return self.status is None and self.proc.returncode is None

    def send(self, sig: int) -> None:
        """Deliver a signal to the main process only (what Fly's init does with stop and /signal)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)

    def kill_group(self, sig: int) -> None:
        """Deliver a signal to the whole process group (the VM: kill, freeze, thaw)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def settle_stop(self, stopped: bool, timeout: float = 2.0) -> None:
        """Wait until the kernel shows the main process stopped (or running again).

        Signals are delivered asynchronously: right after SIGSTOP the process may still be running
        on another CPU. Whoever reports "frozen" must not be ahead of the kernel.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            state = self.proc_state()
            if state is None or state in ("Z", "X") or (state in ("T", "t")) == stopped:
                return
            await asyncio.sleep(0.005)

    def proc_state(self) -> str | None:
        """The kernel's state letter of the main process (R, S, T, Z...), or None when gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        return stat.rsplit(")", 1)[1].split()[0]
