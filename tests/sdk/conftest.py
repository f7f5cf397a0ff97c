"""A real API for the SDK tests (the CLI tests' ``flyswarm api`` on the per-process Redis), and
:class:`Sdk`: one synchronous way to drive either client, so each test runs against both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import pytest

from flyswarm import AsyncClient, Client
from tests.cli.conftest import (  # noqa: F401 (fixtures, shared with the CLI tests)
    api_url,
    clean_redis,
    live_api,
    secured_api,
)

Kind = Literal["sync", "async"]


class Sdk:
    """``sdk("get", "id")`` calls ``Client.get`` or ``AsyncClient.get`` on a fresh client; an
    iterator (``list``, ``events``) comes back as a list."""

    def __init__(self, kind: Kind, url: str, **options: Any) -> None:
        self.kind = kind
        self.url = url
        self.options = options

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "sync":
            with Client(self.url, **self.options) as client:
                result = getattr(client, method)(*args, **kwargs)
                return list(result) if isinstance(result, Iterator) else result

        async def run() -> Any:
            async with AsyncClient(self.url, **self.options) as client:
                result = getattr(client, method)(*args, **kwargs)
                if isinstance(result, AsyncIterator):
                    return [item async for item in result]
                return await result

        return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value
