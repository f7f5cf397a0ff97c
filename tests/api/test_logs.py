"""Secrets never reach a log line: keyed secrets, registered values and URL passwords are masked."""

from __future__ import annotations

import io
import json

from api.logs import configure_logging, get_logger, redact_text, register_secret


def test_log_lines_never_contain_tokens_keys_or_redis_passwords() -> None:
    stream = io.StringIO()
    configure_logging("debug", json=True, stream=stream)
    register_secret("fly-token-abcdef123456")
    log = get_logger("test")
    log.info(
        "settings_loaded",
        fly_api_token="fly-token-abcdef123456",
        anthropic_api_key="sk-ant-secret-value",
        redis_url="redis://fs-session-x:hunter2hunter2@127.0.0.1:6379/0",
        note="header was Bearer fly-token-abcdef123456",
        nested={"password": "p4ssw0rd!", "ok": "visible"},
    )
    line = stream.getvalue()
    record = json.loads(line)
    for secret in ("fly-token-abcdef123456", "sk-ant-secret-value", "hunter2hunter2", "p4ssw0rd!"):
        assert secret not in line
    assert record["event"] == "settings_loaded"
    assert record["redis_url"] == "redis://fs-session-x:***@127.0.0.1:6379/0"
    assert record["nested"]["ok"] == "visible"


def test_redact_text_masks_url_passwords_and_keeps_the_rest() -> None:
    assert redact_text("connect redis://:pw@h:1/0 now") == "connect redis://:***@h:1/0 now"
    assert redact_text("no secrets here") == "no secrets here"
