"""Pure webhook pieces: Standard Webhooks signatures, the SSRF address rules, secrets and URLs."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from api.notify_models import NotifyTarget, check_secret, generate_secret, secret_key
from api.webhook_signing import headers, signature, verify
from api.webhook_targets import TargetRefused, forbidden_reason, resolve


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # From the Standard Webhooks specification's reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    sig = signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_accepts_its_own_headers_and_refuses_tampering_replays_and_other_keys() -> None:
    secret, body = generate_secret(), b'{"type":"session.finished"}'
    sent = headers(secret, "msg_1", 1_000_000, body)
    assert verify(secret, sent, body, now=1_000_010)
    assert not verify(secret, sent, body + b" ", now=1_000_010)
    assert not verify(generate_secret(), sent, body, now=1_000_010)
    assert not verify(secret, {**sent, "webhook-id": "msg_2"}, body, now=1_000_010)
    assert not verify(secret, sent, body, now=1_000_000 + 301)  # outside the tolerance
    rotated = {**sent, "webhook-signature": "v1,bm90LWl0 " + sent["webhook-signature"]}
    assert verify(secret, rotated, body, now=1_000_000)  # any of several signatures may match


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.0.0.5", "private"),
        ("192.168.1.1", "private"),
        ("fdaa::3", "private"),  # Fly's private network
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_forbidden_addresses(address: str, reason: str | None) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) == reason


async def test_literal_hosts_are_checked_without_a_lookup() -> None:
    with pytest.raises(TargetRefused, match="loopback"):
        await resolve("127.0.0.1", 80, allow_private=False)
    assert [str(a) for a in await resolve("[::1]", 80, allow_private=True)] == ["::1"]


def test_secrets_and_notify_targets() -> None:
    secret = generate_secret()
    assert check_secret(secret) == secret and len(secret_key(secret)) == 32
    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_***", "whsec_c2hvcnQ="):
        with pytest.raises(ValueError):
            check_secret(bad)
    target = NotifyTarget(url="https://example.com/hook", secret=secret)
    dumped = target.model_dump(mode="json")
    assert "secret" not in dumped and dumped["secretSet"] is True
    assert secret not in target.model_dump_json() and secret not in repr(target.model_dump())
    with pytest.raises(ValidationError, match="not both"):
        NotifyTarget(url="https://example.com/hook", secret=secret, secretRef="ci-hook")
    with pytest.raises(ValidationError, match="http"):
        NotifyTarget(url="file:///etc/passwd", secret=secret)


def test_the_readmes_verification_snippet_accepts_a_signed_delivery_and_refuses_a_forged_one() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- verify:begin -->")[1].split("<!-- verify:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the documented snippet, verbatim
    readme_verify = namespace["verify"]
    secret, body = generate_secret(), b'{"type":"session.phase_changed"}'
    sent = headers(secret, "msg_readme", int(time.time()), body)
    assert readme_verify(secret, sent, body) is True
    assert readme_verify(secret, sent, body.replace(b"phase", b"phaze")) is False
    assert readme_verify(generate_secret(), sent, body) is False
