"""Broker URLs: scheme registry errors and password redaction."""

from __future__ import annotations

import pytest

from herald.transports import open_transport, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("amqp://guest:s3cret@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("kafka://u:s3cret@a:9092,b:9092", "kafka://u:***@a:9092,b:9092"),
        ("nats://h:4222?token=s3cret&x=1", "nats://h:4222?token=***&x=1"),
        ("amqp://u:s3cret@h/vh?password=s3cret", "amqp://u:***@h/vh?password=***"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("sqlite:////abs/x.db?visibility_timeout=1", "sqlite:////abs/x.db?visibility_timeout=1"),
        ("mqtt://user@h:1883", "mqtt://user@h:1883"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_hides_secrets_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_unknown_scheme_lists_supported_ones_without_the_password() -> None:
    with pytest.raises(ValueError) as info:
        open_transport("postgres://u:s3cret@h/db")
    text = str(info.value)
    assert "unknown broker URL scheme 'postgres'" in text
    for scheme in ("memory://", "sqlite://", "redis://", "amqp://", "kafka://", "nats://"):
        assert scheme in text
    assert "s3cret" not in text


@pytest.mark.parametrize("url", ["", "localhost:6379", "no-scheme"])
def test_url_without_scheme_is_a_clear_error(url: str) -> None:
    with pytest.raises(ValueError, match="has no scheme"):
        open_transport(url)
