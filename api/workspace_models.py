"""What a session's work dir starts with (``spec.workspace``), what goes out (``spec.output.push``),
and what the agent reports about it (``agent.workspace``).

**Sources.** ``git`` lists repositories cloned before the first turn, each at ``ref`` (a branch, a
tag or a commit sha; the remote's HEAD when omitted) into ``path`` (relative to the work dir,
``.`` = the work dir itself), optionally shallow (``depth``). Schemes: ``https`` and ``http`` - the
agent clones them through the control plane's git proxy (``/git/<index>/...`` on the gateway, with
its session token), which alone adds the credential named by ``secret``; and ``file`` (a repository
on the machine's own disk: images with a baked-in mirror, and local tests), which takes no secret.
``ssh`` and ``git://`` are refused: they would need a key on the machine or bypass the proxy.
A URL with credentials in it (``https://user:token@...``) is refused: credentials are named, never
inline.

**Files.** ``files`` are small inline files written after the clones (one may land inside a
repository: a ``CLAUDE.md``, a config); they are inputs, never reported in a diff or pushed.
At most :data:`MAX_FILES` files and :data:`MAX_FILES_BYTES` bytes of content in all: the spec is
stored and read whole.

**Paths.** Relative POSIX paths, no ``..`` component, no absolute path, no backslash or control
character; two sources may not overlap (one inside the other), and no file may sit where a
source's directory goes.

**Results.** :class:`WorkspaceReport`: per source, the commit it started from, the changed files
(added/modified/deleted, at most :data:`MAX_CHANGED_FILES`) and a unified diff against that commit,
every source's diff together capped at :data:`MAX_DIFF_BYTES` (a truncated diff ends with
:data:`TRUNCATION_MARKER`), and the pushed branch and commit when ``spec.output.push`` asked for one.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_GIT_SOURCES = 8
MAX_FILES = 64
MAX_FILES_BYTES = 512 * 1024
MAX_DIFF_BYTES = 256 * 1024
MAX_CHANGED_FILES = 1000
TRUNCATION_MARKER = "\n[flyswarm: diff truncated at {limit} of {total} bytes]\n"
GIT_SCHEMES = ("https", "http", "file")

_SECRET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A conservative subset of git-check-ref-format: names and shas, nothing a shell or git reads as an option.
_REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}$")
_MODE_RE = re.compile(r"^0?[0-7]{3}$")


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def check_relative_path(value: str, *, allow_root: bool) -> str:
    """``value`` as a normalized relative POSIX path inside the work dir, or a ValueError saying why."""
    if not value or len(value) > 1024:
        raise ValueError("must be 1-1024 characters")
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("must not contain backslashes or control characters")
    if value.startswith("/"):
        raise ValueError("must be relative to the work dir, not absolute")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("must not contain '..' (it must stay inside the work dir)")
    if not parts:
        if not allow_root:
            raise ValueError("must name a file inside the work dir, not the work dir itself")
        return "."
    return "/".join(parts)


def _valid_ref(value: str) -> bool:
    return bool(_REF_RE.match(value)) and ".." not in value and not value.endswith((".lock", "/"))


def _inside(inner: str, outer: str) -> bool:
    """Whether path ``inner`` is ``outer`` or below it ('.' contains everything)."""
    return outer == "." or inner == outer or PurePosixPath(inner).is_relative_to(outer)


class GitSource(_Input):
    url: str = Field(max_length=2048)
    ref: str | None = None
    path: str = "."
    depth: int | None = Field(default=None, ge=1, le=1_000_000)
    secret: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in GIT_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(GIT_SCHEMES)} (ssh would need a key)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials: name a secret kept by the control plane instead")
        if parts.scheme == "file" and not parts.path.startswith("/"):
            raise ValueError("a file:// URL must name an absolute path")
        if parts.scheme != "file" and not parts.hostname:
            raise ValueError("must name a host")
        if any(ord(c) < 33 for c in value):
            raise ValueError("must not contain spaces or control characters")
        return value

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is not None and not _valid_ref(value):
            raise ValueError("must be a branch, tag or commit sha ([A-Za-z0-9._/-], no '..')")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_relative_path(value, allow_root=True)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and not _SECRET_RE.match(value):
            raise ValueError("must be a secret name (1-64 of [A-Za-z0-9_.-]), never a credential")
        return value

    @model_validator(mode="after")
    def _secret_needs_proxy(self) -> GitSource:
        if self.secret is not None and self.url.startswith("file:"):
            raise ValueError("secret: a file:// source takes no secret")
        return self

    @property
    def proxied(self) -> bool:
        """Cloned through the control plane's git proxy (http and https sources)."""
        return not self.url.startswith("file:")


class WorkspaceFile(_Input):
    path: str
    content: str = Field(default="", max_length=MAX_FILES_BYTES)
    mode: str = "0644"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_relative_path(value, allow_root=False)

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if not _MODE_RE.match(value):
            raise ValueError("must be an octal file mode such as '0644' or '0755'")
        return value


class WorkspaceSpec(_Input):
    git: list[GitSource] = Field(default_factory=list, max_length=MAX_GIT_SOURCES)
    files: list[WorkspaceFile] = Field(default_factory=list, max_length=MAX_FILES)

    @field_validator("git")
    @classmethod
    def _no_overlap(cls, value: list[GitSource]) -> list[GitSource]:
        for i, a in enumerate(value):
            for b in value[:i]:
                if _inside(a.path, b.path) or _inside(b.path, a.path):
                    raise ValueError(f"[{i}].path: {a.path!r} overlaps {b.path!r}; sources may not nest")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[WorkspaceFile]) -> list[WorkspaceFile]:
        total = sum(len(f.content.encode()) for f in value)
        if total > MAX_FILES_BYTES:
            raise ValueError(f"content: {total} bytes in all, more than {MAX_FILES_BYTES}")
        seen: set[str] = set()
        for i, f in enumerate(value):
            if f.path in seen:
                raise ValueError(f"[{i}].path: {f.path!r} is given twice")
            seen.add(f.path)
        return value

    @model_validator(mode="after")
    def _files_clear_of_sources(self) -> WorkspaceSpec:
        for i, f in enumerate(self.files):
            for src in self.git:
                if src.path != "." and _inside(src.path, f.path):
                    raise ValueError(f"files[{i}].path: {f.path!r} is where source {src.path!r} goes")
        return self


class PushSpec(_Input):
    branch: str
    commitMessage: str = Field(default="Changes by flyswarm", min_length=1, max_length=10_000)
    source: int = Field(default=0, ge=0, description="index into spec.workspace.git")

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        if not _valid_ref(value):
            raise ValueError("must be a new branch name ([A-Za-z0-9._/-], no '..')")
        return value


# -- results (written by the agent) ---------------------------------------------------------------


class ChangedFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str
    status: Literal["added", "modified", "deleted"]


class PushResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    branch: str
    commit: str | None = None
    url: str | None = None
    message: str | None = None
    error: str | None = None


class SourceResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str
    url: str
    ref: str | None = None
    commit: str
    changedFiles: list[ChangedFile] = Field(default_factory=list)
    changedFilesTruncated: bool = False
    diff: str = ""
    diffBytes: int = 0
    diffTruncated: bool = False
    push: PushResult | None = None


class WorkspaceReport(BaseModel):
    """The ``workspace`` part of the agent's report (bounded: see the module docstring)."""

    model_config = ConfigDict(extra="ignore")

    sources: list[SourceResult] = Field(default_factory=list)

    def unified_diff(self) -> str:
        return "".join(s.diff for s in self.sources)
