"""Run the model gateway under uvicorn: ``flyswarm gateway`` (``main()``), or ``python -m gateway.server``.

uvicorn's own access log, ``server`` and ``date`` headers are off: the upstream's headers are
relayed as they are, and the gateway logs through :func:`api.logs.configure_logging` (JSON,
redacted; the upstream key is registered as a secret so it can never show in a log line).
"""

from __future__ import annotations

import uvicorn

from api.logs import configure_logging, get_logger, register_secret
from gateway.app import create_app
from gateway.settings import GatewaySettings


def uvicorn_config(settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )


def serve(settings: GatewaySettings) -> None:
    configure_logging(settings.log_level, json=settings.log_json)
    if settings.upstream_api_key is not None:
        register_secret(settings.upstream_api_key.get_secret_value())
    else:
        get_logger("gateway").warning("gateway_no_upstream_key", upstream=settings.upstream_url)
    get_logger("gateway").info(
        "gateway_serving", host=settings.host, port=settings.port, upstream=settings.upstream_url
    )
    uvicorn.Server(uvicorn_config(settings)).run()


def main() -> None:
    """Entry point of ``flyswarm gateway``: settings from the environment and ``.env``."""
    serve(GatewaySettings())


if __name__ == "__main__":  # pragma: no cover
    main()
