"""The session's work dir: code in before the first turn, changes out after the run.

**In** (:meth:`Workspace.prepare`). Each ``spec.workspace.git`` source is fetched at its ref and
checked out (detached) in its path: ``git init``, ``git fetch --no-tags [--depth N] origin <ref>``
(a branch, a tag or a commit sha alike), ``git checkout --detach FETCH_HEAD``. Then the inline
files are written. An ``http(s)`` source is fetched from the control plane's git proxy
(``$FLYSWARM_CONTROL_URL/git/<index>``, :mod:`gateway.git`) with the session token as a bearer
header given to that one git process (``GIT_CONFIG_*`` variables: never in a URL, a config file
or the CLI's environment); the proxy adds the named secret. A ``file://`` source is fetched directly.

**Idempotent across restarts.** When everything is in place a marker (``workspace.json``, in the
session dir beside the work dir, out of the model's tree) records the spec it was prepared for and
the commits checked out. A restarted agent that finds a marker for the same spec keeps the tree as
it is (the model's earlier edits included); without one it removes every declared path - a
half-done clone included - and prepares them all again from scratch.

**Out** (:meth:`Workspace.results`, task sessions). Per source, against the commit it started
from: the work tree's state is staged in a private index (``GIT_INDEX_FILE``, seeded from that
commit, so neither the model's index nor its commits matter), and ``git diff --cached`` gives the
changed files and the unified diff (paths prefixed with the source's path, so the whole diff
applies from the work dir). With ``spec.output.push`` (and a successful run), that index's tree
becomes one commit on top of the starting commit, pushed to a *new* branch: an existing branch is
refused, so a session never overwrites anyone's work.

Failures raise :class:`WorkspaceError` with git's own message, the session token and any URL
credentials scrubbed and the proxy's address replaced by the source's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from agent.outcome import Outcome
from api.logs import get_logger
from api.models import OutputSpec
from api.workspace_models import (
    MAX_CHANGED_FILES,
    MAX_DIFF_BYTES,
    TRUNCATION_MARKER,
    ChangedFile,
    GitSource,
    PushResult,
    PushSpec,
    SourceResult,
    WorkspaceReport,
    WorkspaceSpec,
)

if TYPE_CHECKING:
    from agent.context import AgentContext
    from agent.settings import AgentSettings
    from api.models import Session

log = get_logger("agent.workspace")

MARKER = "workspace.json"
GIT_TIMEOUT_SECONDS = 300.0
_USERINFO_RE = re.compile(r"(\w+://)[^/@\s]+@")
_STATUS = {"A": "added", "M": "modified", "D": "deleted", "T": "modified"}


class WorkspaceError(Exception):
    """A workspace step failed; the message is safe to report (scrubbed)."""


@dataclass(frozen=True)
class GitRun:
    code: int
    out: bytes
    err: str
    total: int  # bytes of stdout, before the limit


class Workspace:
    def __init__(
        self,
        spec: WorkspaceSpec,
        output: OutputSpec | None,
        *,
        work_dir: Path,
        state_dir: Path,
        home_dir: Path,
        control_url: str,
        token: str,
    ) -> None:
        self.spec = spec
        self.output = output
        self.work_dir = work_dir
        self.state_dir = state_dir
        self.home_dir = home_dir
        self.control_url = control_url.rstrip("/")
        self._token = token
        self.commits: list[str] = []

    # -- git ----------------------------------------------------------------------------------------

    def remote_url(self, index: int, source: GitSource) -> str:
        return f"{self.control_url}/git/{index}" if source.proxied else source.url

    def _env(self, source: GitSource | None, index_file: Path | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home_dir),
            "LANG": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_ASKPASS": "/bin/false",
        }
        if source is not None and source.proxied:
            # Given to this git process alone, and only for the control plane's URL: the token never
            # lands in .git/config or a URL, nor goes to a remote the model may have configured.
            env.update(
                GIT_CONFIG_COUNT="1",
                GIT_CONFIG_KEY_0=f"http.{self.control_url}/.extraHeader",
                GIT_CONFIG_VALUE_0=f"Authorization: Bearer {self._token}",
            )
        if index_file is not None:
            env["GIT_INDEX_FILE"] = str(index_file)
        return env

    def scrub(self, text: str, index: int | None = None, source: GitSource | None = None) -> str:
        if self._token:
            text = text.replace(self._token, "***")
        if index is not None and source is not None and source.proxied:
            text = text.replace(self.remote_url(index, source), source.url)
        return _USERINFO_RE.sub(r"\1***@", text).strip()[-2000:]

    async def _git(
        self,
        cwd: Path,
        *args: str,
        source: GitSource | None = None,
        index_file: Path | None = None,
        limit: int = 1 << 20,
    ) -> GitRun:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=str(cwd),
            env=self._env(source, index_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        kept = bytearray()
        total = 0

        async def read_out() -> None:
            nonlocal total
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                total += len(chunk)
                if len(kept) < limit:
                    kept.extend(chunk[: limit - len(kept)])

        try:
            async with asyncio.timeout(GIT_TIMEOUT_SECONDS):
                _, err = await asyncio.gather(read_out(), proc.stderr.read())
                code = await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise WorkspaceError(f"git {args[0]} took longer than {GIT_TIMEOUT_SECONDS:.0f} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        return GitRun(code, bytes(kept), err.decode(errors="replace"), total)

    async def _checked(self, index: int, source: GitSource, cwd: Path, *args: str) -> GitRun:
        run = await self._git(cwd, *args, source=source)
        if run.code != 0:
            detail = self.scrub(run.err or f"exit code {run.code}", index, source)
            raise WorkspaceError(f"git[{index}] ({source.url}): git {args[0]} failed: {detail}")
        return run

    # -- in -----------------------------------------------------------------------------------------

    def _marker_key(self) -> str:
        return self.spec.model_dump_json()

    def _read_marker(self) -> list[str] | None:
        try:
            data = json.loads((self.state_dir / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if data.get("spec") != self._marker_key() or len(data.get("commits", [])) != len(self.spec.git):
            return None
        return [str(c) for c in data["commits"]]

    def _clear(self) -> None:
        """Remove every declared path (what a half-done earlier attempt may have left)."""
        for rel in [s.path for s in self.spec.git] + [f.path for f in self.spec.files]:
            target = self.work_dir if rel == "." else self.work_dir / rel
            if target == self.work_dir:
                for child in self.work_dir.iterdir():
                    _remove(child)
            elif target.exists() or target.is_symlink():
                _remove(target)

    async def prepare(self) -> bool:
        """Put the sources and files in place; False when a marker says they already are."""
        commits = self._read_marker()
        if commits is not None:
            self.commits = commits
            return False
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / MARKER).unlink(missing_ok=True)
        self._clear()
        self.commits = [await self._clone(i, s) for i, s in enumerate(self.spec.git)]
        for f in self.spec.files:
            target = self.work_dir / f.path
            if not target.resolve().is_relative_to(self.work_dir.resolve()):
                raise WorkspaceError(f"files: {f.path!r} resolves outside the work dir (a symlink?)")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.content)
            target.chmod(int(f.mode, 8))
        tmp = self.state_dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"spec": self._marker_key(), "commits": self.commits}))
        tmp.replace(self.state_dir / MARKER)
        return True

    async def _clone(self, index: int, source: GitSource) -> str:
        dest = self.work_dir / source.path
        dest.mkdir(parents=True, exist_ok=True)
        await self._checked(index, source, dest, "init", "-q")
        await self._checked(index, source, dest, "remote", "add", "origin", self.remote_url(index, source))
        fetch = ["fetch", "-q", "--no-tags"] + ([f"--depth={source.depth}"] if source.depth else [])
        await self._checked(index, source, dest, *fetch, "origin", source.ref or "HEAD")
        await self._checked(index, source, dest, "checkout", "-q", "--detach", "FETCH_HEAD")
        for key, value in (("user.name", "flyswarm"), ("user.email", "agent@flyswarm.invalid")):
            await self._checked(index, source, dest, "config", key, value)
        run = await self._checked(index, source, dest, "rev-parse", "HEAD")
        return run.out.decode().strip()

    # -- out ----------------------------------------------------------------------------------------

    async def results(self, *, push: bool) -> WorkspaceReport:
        """Each source's changes against its starting commit; pushed when asked (and ``push``)."""
        budget = MAX_DIFF_BYTES
        sources: list[SourceResult] = []
        for index, (source, commit) in enumerate(zip(self.spec.git, self.commits, strict=True)):
            result, tree = await self._changes(index, source, commit, budget)
            budget = max(0, budget - len(result.diff.encode()))
            wanted = self.output.push if self.output else None
            if push and wanted is not None and wanted.source == index:
                try:
                    result.push = await self._push(index, source, commit, tree, wanted)
                except WorkspaceError as exc:
                    result.push = PushResult(branch=wanted.branch, error=str(exc))
            sources.append(result)
        return WorkspaceReport(sources=sources)

    async def _changes(
        self, index: int, source: GitSource, commit: str, budget: int
    ) -> tuple[SourceResult, str | None]:
        dest = self.work_dir / source.path
        index_file = self.state_dir / f"workspace-index-{index}"
        index_file.unlink(missing_ok=True)
        for args in (("read-tree", commit), ("add", "-A", ".")):
            run = await self._git(dest, *args, index_file=index_file)
            if run.code != 0:
                raise WorkspaceError(f"git[{index}]: git {args[0]} failed: {self.scrub(run.err)}")
        inputs = [
            f":(literal){PurePosixPath(f.path).relative_to(source.path)}"
            for f in self.spec.files
            if source.path == "." or PurePosixPath(f.path).is_relative_to(source.path)
        ]
        if inputs:  # the spec's own files are inputs, never changes to report or push
            run = await self._git(dest, "reset", "-q", commit, "--", *inputs, index_file=index_file)
            if run.code != 0:
                raise WorkspaceError(f"git[{index}]: git reset failed: {self.scrub(run.err)}")
        tree = (await self._git(dest, "write-tree", index_file=index_file)).out.decode().strip() or None
        base = ["diff", "--cached", "--no-renames", "--no-ext-diff", "--no-color", commit]
        names = await self._git(dest, *base, "--name-status", "-z", index_file=index_file)
        fields = names.out.decode(errors="replace").split("\0")
        changed = [
            ChangedFile(path=_join(source.path, p), status=_STATUS.get(s[:1], "modified"))
            for s, p in zip(fields[0::2], fields[1::2], strict=False)
            if s
        ]
        prefix = "" if source.path == "." else source.path + "/"
        prefixes = (f"--src-prefix=a/{prefix}", f"--dst-prefix=b/{prefix}")
        diff = await self._git(dest, *base, *prefixes, index_file=index_file, limit=budget)
        text = diff.out.decode(errors="replace")
        truncated = diff.total > len(diff.out)
        if truncated:
            text += TRUNCATION_MARKER.format(limit=len(diff.out), total=diff.total)
        result = SourceResult(
            path=source.path,
            url=source.url,
            ref=source.ref,
            commit=commit,
            changedFiles=changed[:MAX_CHANGED_FILES],
            changedFilesTruncated=len(changed) > MAX_CHANGED_FILES,
            diff=text,
            diffBytes=diff.total,
            diffTruncated=truncated,
        )
        return result, tree if changed else None

    async def _push(
        self, index: int, source: GitSource, commit: str, tree: str | None, wanted: PushSpec
    ) -> PushResult:
        branch, message = wanted.branch, wanted.commitMessage
        dest = self.work_dir / source.path
        if tree is None:
            return PushResult(branch=branch, message="no changes: nothing was pushed")
        ref = f"refs/heads/{branch}"
        remote = self.remote_url(index, source)  # named, not "origin": the model may have changed that
        listed = await self._checked(index, source, dest, "ls-remote", remote, ref)
        if listed.out.strip():
            raise WorkspaceError(
                f"output.push: branch {branch!r} already exists on {source.url}; flyswarm pushes only to a "
                "new branch, so a session never overwrites work it did not start from"
            )
        made = await self._checked(index, source, dest, "commit-tree", tree, "-p", commit, "-m", message)
        new_commit = made.out.decode().strip()
        await self._checked(index, source, dest, "push", "-q", remote, f"{new_commit}:{ref}")
        return PushResult(branch=branch, commit=new_commit, url=source.url)


def _join(prefix: str, path: str) -> str:
    return path if prefix == "." else f"{prefix}/{path}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- the agent's two steps ------------------------------------------------------------------------


def for_session(session: Session, settings: AgentSettings) -> Workspace | None:
    spec = session.spec.workspace
    if spec is None or not (spec.git or spec.files):
        return None
    return Workspace(
        spec,
        session.spec.output,
        work_dir=settings.work_dir,
        state_dir=settings.session_dir,
        home_dir=settings.home_dir,
        control_url=settings.control_url,
        token=settings.session_token.get_secret_value(),
    )


async def prepare_step(workspace: Workspace, emit: Callable[..., None]) -> Outcome | None:
    """Prepare before the first turn; the failed outcome (``WorkspaceFailed``) when it cannot be.

    ``emit(type, message, **data)`` publishes a lifecycle event."""
    try:
        fresh = await workspace.prepare()
    except (WorkspaceError, OSError) as exc:
        message = workspace.scrub(str(exc))
        log.warning("workspace_failed", error=message)
        emit("workspace_failed", message, reason="WorkspaceFailed")
        return Outcome.error("WorkspaceFailed", message)
    emit(
        "workspace_prepared",
        "prepared" if fresh else "kept from an earlier attempt",
        commits=workspace.commits,
        files=len(workspace.spec.files),
        fresh=fresh,
    )
    return None


async def finish_step(workspace: Workspace, ctx: AgentContext, outcome: Outcome) -> Outcome:
    """Record the changes (and push them after a successful run); a failed push fails the session."""
    if not workspace.spec.git:
        return outcome
    try:
        report = await workspace.results(push=outcome.state == "done")
    except (WorkspaceError, OSError) as exc:
        message = workspace.scrub(str(exc))
        ctx.log.warning("workspace_results_failed", error=message)
        return Outcome.error("WorkspaceFailed", message) if outcome.state == "done" else outcome
    await ctx.reporter.update(workspace=report)
    files = sum(len(s.changedFiles) for s in report.sources)
    pushed = [s.push for s in report.sources if s.push is not None]
    ctx.emit("workspace_changes", f"{files} changed file(s)", changedFiles=files)
    for push in pushed:
        if push.error:
            ctx.emit("workspace_push_failed", push.error, branch=push.branch)
            if outcome.state == "done":
                return Outcome.error("WorkspaceFailed", push.error)
        elif push.commit:
            ctx.emit("workspace_pushed", push.branch, branch=push.branch, commit=push.commit)
    return outcome
