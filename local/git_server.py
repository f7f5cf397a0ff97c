"""A local git smart-HTTP server: ``git http-backend`` (CGI) behind a small threaded WSGI server.

It stands where GitHub does, for ``make up`` (the ``git`` component serves ``demo.git``, the
repository ``manifests/examples/fix-bug.yaml`` fixes) and for the tests (a private repository
behind Basic auth, pushes received). Every bare repository under ``root`` is served at
``/<name>.git``; pushes are accepted (``http.receivepack``). With ``credentials`` (``user:password``)
every request needs that Basic auth, else 401 with a challenge - as a private repository answers.

``python -m local.git_server --root DIR --port N [--demo]`` runs it in the foreground; ``--demo``
first creates ``DIR/demo.git`` (idempotent) from :data:`DEMO_FILES`.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

DEMO_FILES = {
    "README.md": "# demo\n\nA tiny library with a bug: `add` subtracts.\n",
    ".gitignore": "__pycache__/\n",
    "calc.py": 'def add(a: int, b: int) -> int:\n    """The sum of a and b."""\n    return a - b\n',
    "test_calc.py": "from calc import add\n\n\ndef test_add() -> None:\n    assert add(2, 3) == 5\n",
}
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "flyswarm",
    "GIT_AUTHOR_EMAIL": "demo@flyswarm.invalid",
    "GIT_COMMITTER_NAME": "flyswarm",
    "GIT_COMMITTER_EMAIL": "demo@flyswarm.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def make_bare_repo(path: Path, files: dict[str, str], *, branch: str = "main") -> str:
    """A bare repository at ``path`` with one commit of ``files`` on ``branch``; its sha."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(path.parent), **_GIT_IDENTITY}
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(content)
        for args in (
            ["init", "-q", "-b", branch],
            ["add", "-A"],
            ["commit", "-q", "-m", "initial"],
            ["clone", "-q", "--bare", tmp, str(path)],
        ):
            subprocess.run(["git", *args], cwd=tmp, env=env, check=True, capture_output=True)
    out = subprocess.run(["git", "rev-parse", branch], cwd=path, env=env, check=True, capture_output=True)
    return out.stdout.decode().strip()


def _cgi_response(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, _, body = raw.partition(b"\n\n")
    status = "200 OK"
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = value.strip()
        elif name:
            headers.append((name.strip(), value.strip()))
    return status, headers, body


@dataclass
class GitHttpApp:
    root: Path
    credentials: str | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)

    def _authorized(self, environ: dict[str, Any]) -> bool:
        if self.credentials is None:
            return True
        expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
        return hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), expected.encode())

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        self.requests.append((method, path))
        if not self._authorized(environ):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"')])
            return [b"authentication required\n"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        cgi = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.receivepack",
            "GIT_CONFIG_VALUE_0": "true",
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": environ.get("REMOTE_ADDR", "127.0.0.1"),
            "REMOTE_USER": "flyswarm",
        }
        for name in ("HTTP_CONTENT_ENCODING", "HTTP_GIT_PROTOCOL"):
            if name in environ:
                cgi[name] = environ[name]
        done = subprocess.run(["git", "http-backend"], input=body, env=cgi, capture_output=True, timeout=120)
        status, headers, out = _cgi_response(done.stdout)
        start_response(status, headers)
        return [out]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class GitServer:
    app: GitHttpApp
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_in_thread(root: Path, *, port: int = 0, credentials: str | None = None) -> GitServer:
    app = GitHttpApp(root, credentials)
    server = make_server("127.0.0.1", port, app, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="git-server", daemon=True)
    thread.start()
    return GitServer(app, server, thread)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.git_server", description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4282)
    parser.add_argument("--demo", action="store_true", help="create ROOT/demo.git first (if missing)")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    if args.demo and not (args.root / "demo.git").exists():
        make_bare_repo(args.root / "demo.git", DEMO_FILES)
    server = make_server(
        args.host, args.port, GitHttpApp(args.root), server_class=_Server, handler_class=_QuietHandler
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
