"""Every typed error, provoked for real, from both clients; the retry policy against a real outage."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flyswarm import (
    Conflict,
    FlyswarmError,
    Invalid,
    NotFound,
    Retry,
    ServerUnreachable,
    Timeout,
    Unauthorized,
    Unavailable,
)
from local.redis_server import free_port
from tests.cli.conftest import LiveApi, serve_api, stop_api
from tests.restartable_redis import RestartableRedis
from tests.sdk.conftest import Kind, Sdk

SESSION = {"metadata": {"name": "known"}, "spec": {"prompt": "p"}}


def test_api_errors_are_typed(kind: Kind, api_url: str, secured_api: LiveApi) -> None:
    sdk = Sdk(kind, api_url)
    with pytest.raises(NotFound) as missing:
        sdk("get", "absent")
    assert missing.value.status == 404 and missing.value.request_id

    bad = {"metadata": {"name": "bad"}, "spec": {"prompt": "p", "maxTurns": 0, "sleep": "hibernate"}}
    with pytest.raises(Invalid) as invalid:
        sdk("apply", bad)
    assert invalid.value.status == 422
    assert {f.field for f in invalid.value.fields} == {"spec.maxTurns", "spec.sleep"}
    assert "spec.maxTurns: " in str(invalid.value)
    with pytest.raises(Invalid) as selector:
        sdk("list", selector="team in (ios")
    assert selector.value.status == 400 and [f.field for f in selector.value.fields] == ["labelSelector"]

    sdk("create", SESSION)
    with pytest.raises(Conflict) as conflict:
        sdk("create", {**SESSION, "spec": {"prompt": "another"}})
    assert conflict.value.status == 409 and conflict.value.code == "conflict"

    for token in ("wrong-token", None):
        with pytest.raises(Unauthorized) as refused:
            Sdk(kind, secured_api.url, token=token)("list")
        assert refused.value.status == 401 and "FLYSWARM_TOKEN" in str(refused.value)
        assert "wrong-token" not in str(refused.value) + repr(refused.value)
    assert [s.id for s in Sdk(kind, secured_api.url, token="right-token")("list")] == ["known"]


def test_an_unreachable_port_is_named(kind: Kind) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable) as caught:
        Sdk(kind, url, retry=Retry(retries=1, backoff=0.01))("list")
    assert (
        str(caught.value)
        == f"cannot reach the flyswarm API at {url}: connection refused — is `make up` running?"
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_server_that_never_answers_is_a_timeout(kind: Kind, silent_port: int) -> None:
    with pytest.raises(Timeout, match="did not answer in time"):
        Sdk(kind, f"http://127.0.0.1:{silent_port}", timeout=0.3)("get", "x")


@pytest.fixture
def outage(own_redis: RestartableRedis, tmp_path: Path) -> Iterator[tuple[RestartableRedis, LiveApi]]:
    api = serve_api(tmp_path, own_redis.url, FLYSWARM_REDIS_TIMEOUT_SECONDS="1")
    try:
        yield own_redis, api
    finally:
        stop_api(api)


@pytest.mark.timeout(90)
def test_503_is_retried_for_idempotent_calls_only_then_succeeds(
    kind: Kind, outage: tuple[RestartableRedis, LiveApi]
) -> None:
    redis, api = outage
    Sdk(kind, api.url)("create", SESSION)
    Sdk(kind, api.url)("apply", {"metadata": {"name": "chat"}, "spec": {"mode": "chat"}})
    redis.stop()

    with pytest.raises(Unavailable) as down:
        Sdk(kind, api.url, retry=Retry(retries=0))("get", "known")
    assert down.value.status == 503 and down.value.retry_after == 1.0

    retries: list[FlyswarmError] = []
    counting = Retry(retries=5, backoff=0.01, max_retry_after=0.01, on_retry=lambda _n, e: retries.append(e))
    with pytest.raises(Unavailable):
        Sdk(kind, api.url, retry=counting)("send", "chat", "hello")
    with pytest.raises(Unavailable):
        Sdk(kind, api.url, retry=counting)("create", {"prompt": "no id: not idempotent"})
    assert retries == []

    def bring_redis_back(attempt: int, error: FlyswarmError) -> None:
        retries.append(error)
        if attempt == 2:
            redis.start()

    patient = Retry(retries=50, backoff=0.05, max_backoff=0.2, max_retry_after=0.2, on_retry=bring_redis_back)
    got: Any = Sdk(kind, api.url, retry=patient)("get", "known")
    assert got.id == "known"
    assert len(retries) >= 2 and all(isinstance(e, Unavailable | ServerUnreachable) for e in retries)
    # A create that names its id is idempotent, so it was safe to retry; it is still the same session.
    assert Sdk(kind, api.url, retry=patient)("create", SESSION).metadata.generation == 1
