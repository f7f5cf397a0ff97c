"""The API process: its bind safety check, a real `python -m api.server`, and secrets kept out of logs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.logs import configure_logging
from api.server import UnsafeBind, check_bind
from api.settings import ApiSettings, is_loopback_host
from local.redis_server import RedisServer, free_port, start_redis
from tests.api.app_harness import api_settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-never-log-me-8f3a9c"
REDIS_PASSWORD = "redis-pw-never-log-me-77"


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "pw-redis", password=REDIS_PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("fly-local-6pn", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_binding_a_public_address_needs_tokens() -> None:
    with pytest.raises(UnsafeBind, match="API_TOKENS"):
        check_bind(api_settings("redis://127.0.0.1:1/0", host="0.0.0.0"))
    check_bind(api_settings("redis://127.0.0.1:1/0", host="0.0.0.0", api_tokens="a-token-1234"))
    check_bind(api_settings("redis://127.0.0.1:1/0", host="127.0.0.1"))


def test_api_tokens_come_comma_separated_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKENS", " one-token-1 , two-token-2,,")
    monkeypatch.setenv("PORT", "9999")
    settings = ApiSettings(_env_file=None)
    assert settings.token_values() == ["one-token-1", "two-token-2"] and settings.port == 9999
    assert "one-token-1" not in repr(settings)


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_TOKENS", "HOST", "PORT", "REDIS_URL")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.mark.timeout(30)
def test_server_refuses_a_public_bind_without_tokens_and_exits_nonzero(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.server"],
        env=_server_env(HOST="0.0.0.0", PORT=str(free_port())),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr and "API_TOKENS" in result.stderr


@pytest.mark.timeout(60)
def test_real_server_answers_the_seed_calls_and_never_logs_secrets(
    tmp_path: Path, password_redis: RedisServer
) -> None:
    port = free_port()
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.server"],
            env=_server_env(
                HOST="127.0.0.1",
                PORT=str(port),
                REDIS_URL=password_redis.url,
                API_TOKENS=f"{TOKEN},second-token-xyz",
                LOG_LEVEL="debug",
            ),
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=base, headers=auth, timeout=10) as client:
            assert client.get("/health").json() == {"status": "ok"}
            created = client.post("/sessions", json={"prompt": "List files in the current directory"})
            assert created.status_code == 201
            session_id = created.json()["session_id"]
            got = client.get(f"/sessions/{session_id}")
            assert got.status_code == 200 and got.json()["session_id"] == session_id
            assert client.get("/readyz").status_code == 200
            responses = [created, got]
        refused = httpx.get(f"{base}/sessions", headers={"Authorization": f"Bearer {TOKEN}x"})
        assert refused.status_code == 401
        for response in [*responses, refused]:
            assert TOKEN not in response.text and REDIS_PASSWORD not in response.text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM)
    logs = log_path.read_text()
    assert '"event": "api_stopped"' in logs
    assert '"event": "http_request"' in logs and '"route": "/sessions/{id}"' in logs
    assert TOKEN not in logs and REDIS_PASSWORD not in logs


async def test_a_request_cycle_logs_no_token_and_no_redis_password(password_redis: RedisServer) -> None:
    stream = io.StringIO()
    configure_logging("debug", json=True, stream=stream)
    try:
        settings = api_settings(password_redis.url, api_tokens=TOKEN)
        app = create_app(settings)

        async def leak() -> None:
            raise RuntimeError(f"token {TOKEN} and url {password_redis.url}")

        app.add_api_route("/leak", leak)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            bodies = [
                await client.post("/sessions", json={"prompt": "p", "session_id": "s1"}, headers=auth),
                await client.get("/sessions/s1", headers=auth),
                await client.get("/sessions/s1", headers={"Authorization": f"Bearer {TOKEN}-wrong"}),
                await client.get("/leak", headers=auth),
                await client.get("/metrics", headers=auth),
            ]
        await app.state.ctx.store.close()
    finally:
        configure_logging("info")
    assert [r.status_code for r in bodies] == [201, 200, 401, 500, 200]
    logs = stream.getvalue()
    lines = [json.loads(line) for line in logs.splitlines()]
    assert sum(1 for line in lines if line["event"] == "http_request") == 5
    assert any(line["event"] == "request_failed" and "exception" in line for line in lines)
    for text in [logs, *(r.text for r in bodies)]:
        assert TOKEN not in text and REDIS_PASSWORD not in text
