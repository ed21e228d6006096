"""Settings: TOML file, then ``HUB_*`` environment, then overrides (flags); every bad value is a
one-line ``ConfigError`` naming the field; dev mode (no secret) only on loopback addresses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hubfix import SECRET, make_settings

from hub.config import (
    ConfigError,
    Namespace,
    Settings,
    check_serving,
    load_settings,
    summary,
)

FILE = """
port = 1111
max_subscriptions = 7
allowed_origins = ["https://file.example"]
token_secret = "from-the-file-0123456789abcdef0123"

[namespaces.chat]
publish = true
max_message_size = 2048

[namespaces.private]
subscribe = "token"

[namespaces.default]
publish = true
"""


def write(tmp_path: Path, text: str, name: str = "hub.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_file_values_and_namespaces(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FILE), env={})
    assert s.port == 1111
    assert s.max_subscriptions == 7
    assert s.allowed_origins == ["https://file.example"]
    assert not s.insecure
    assert s.namespace("chat:room") == Namespace(name="chat", publish=True, max_message_size=2048)
    assert s.namespace("private:x").subscribe == "token"
    # "default" configures channels without a known namespace (and without a colon).
    assert s.namespace("news").publish is True
    assert s.namespace("unknown:x").publish is True
    assert s.namespace("chat").publish is True  # no colon: not the chat namespace
    assert s.namespace("chat").max_message_size == 65536


def test_outbound_policies_load_per_namespace(tmp_path: Path) -> None:
    text = 'write_delay = 2.5\n[namespaces.tick]\nslow_consumer = "latest"\nwrite_delay = 0\n'
    s = load_settings(write(tmp_path, text), env={})
    assert s.write_delay == 2.5
    assert s.namespace("tick:x").slow_consumer == "latest"
    assert s.namespace("tick:x").write_delay == 0  # its own: no delay, whatever the global one
    assert s.namespace("other:x").slow_consumer == "close"
    assert s.namespace("other:x").write_delay is None  # the global one


def test_the_default_namespace_has_one_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, '[namespaces.""]\npublish = true\n')
    with pytest.raises(ConfigError, match=r"\[namespaces.default\]"):
        load_settings(path, env={})


def test_hub_table_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "[hub]\nport = 2345\n[hub.namespaces.chat]\npublish = true\n")
    s = load_settings(path, env={})
    assert s.port == 2345
    assert s.namespace("chat:x").publish


def test_environment_overrides_file_and_overrides_override_both(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    env = {"HUB_PORT": "2222", "HUB_MAX_SUBSCRIPTIONS": "8", "HUB_ALLOWED_ORIGINS": "a, b"}
    s = load_settings(path, env=env)
    assert (s.port, s.max_subscriptions, s.allowed_origins) == (2222, 8, ["a", "b"])
    s = load_settings(path, env=env, overrides={"port": 3333, "max_subscriptions": None})
    assert (s.port, s.max_subscriptions) == (3333, 8)  # None means "flag not given"
    assert s.token_secret == "from-the-file-0123456789abcdef0123"
    s = load_settings(path, env={"HUB_TOKEN_SECRET": SECRET})
    assert s.token_secret == SECRET
    assert s.namespace("chat:x").publish  # namespaces come from the file only


def test_hub_config_environment_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    s = load_settings(None, env={"HUB_CONFIG": str(path)})
    assert s.port == 1111
    explicit = write(tmp_path, "port = 4444\n", "other.toml")
    assert load_settings(explicit, env={"HUB_CONFIG": str(path)}).port == 4444


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)],
)
def test_boolean_environment_values(raw: str, value: bool) -> None:
    s = load_settings(None, env={"HUB_INSECURE": raw, "HUB_TOKEN_SECRET": SECRET})
    assert s.insecure is value


def test_defaults_are_not_dev_mode_and_cannot_serve() -> None:
    s = load_settings(None, env={})
    assert s == Settings(insecure=False)
    assert (s.host, s.port) == ("127.0.0.1", 8765)
    assert s.outbound_buffer == 1 << 20
    # Dev mode never turns itself on: serving needs credentials or an explicit --insecure.
    with pytest.raises(ConfigError) as caught:
        check_serving(s)
    message = str(caught.value)
    assert "\n" not in message
    assert "HUB_TOKEN_SECRET" in message and "--insecure" in message, message
    check_serving(load_settings(None, env={"HUB_INSECURE": "1"}))
    check_serving(load_settings(None, env={"HUB_TOKEN_SECRET": SECRET}))


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "field"),
    [
        ('port = "abc"', {}, {}, "port"),
        ("port = 70000", {}, {}, "port"),
        ("port = -1", {}, {}, "port"),
        ("port = true", {}, {}, "port"),
        ("", {"HUB_PORT": "abc"}, {}, "HUB_PORT"),
        ("", {}, {"port": "abc"}, "port"),
        ("insecure = 'maybe'", {}, {}, "insecure"),
        ("", {"HUB_INSECURE": "maybe"}, {}, "HUB_INSECURE"),
        ("max_subscriptions = -1", {}, {}, "max_subscriptions"),
        ("max_message_size = 1.5", {}, {}, "max_message_size"),
        ("outbound_buffer = 10", {}, {}, "outbound_buffer"),
        ("", {}, {"outbound_buffer": 10}, "outbound_buffer"),
        ("ping_interval = 'soon'", {}, {}, "ping_interval"),
        ("ping_interval = 0", {}, {}, "ping_interval"),
        ("ping_interval = -1", {}, {}, "ping_interval"),
        ("ping_timeout = nan", {}, {}, "ping_timeout"),
        ("ping_timeout = 1e9", {}, {}, "ping_timeout"),
        ("handshake_timeout = 0", {}, {}, "handshake_timeout"),
        ("handshake_timeout = inf", {}, {}, "handshake_timeout"),
        ("", {"HUB_HANDSHAKE_TIMEOUT": "soon"}, {}, "HUB_HANDSHAKE_TIMEOUT"),
        ("", {"HUB_HANDSHAKE_TIMEOUT": "-3"}, {}, "handshake_timeout"),
        ("drain_seconds = -1", {}, {}, "drain_seconds"),
        ("log_level = 'loud'", {}, {}, "log_level"),
        ("workers = 0", {}, {}, "workers"),
        ("workers = 2", {}, {}, "workers"),
        ("redis_url = 'http://x'", {}, {}, "redis_url"),
        ("allowed_origins = [1, 2]", {}, {}, "allowed_origins"),
        ("no_such_setting = 1", {}, {}, "no_such_setting"),
        ("", {}, {"no_such_setting": 1}, "no_such_setting"),
        ("namespaces = 5", {}, {}, "namespaces"),
        ("[namespaces]\nchat = 5", {}, {}, "namespaces.chat"),
        ("[namespaces.chat]\nsubscribe = 'everyone'", {}, {}, "namespaces.chat.subscribe"),
        ("[namespaces.chat]\npublish = 'sometimes'", {}, {}, "namespaces.chat.publish"),
        ("[namespaces.chat]\nbogus = 1", {}, {}, "namespaces.chat.bogus"),
        ("[namespaces.chat]\nmax_message_size = -5", {}, {}, "namespaces.chat.max_message_size"),
        ("port = ", {}, {}, "hub.toml"),
        ("token_secret = 'short'", {}, {}, "token_secret"),
        ("", {"HUB_TOKEN_SECRET": "x" * 31}, {}, "token_secret"),
        (f"token_secret = '{SECRET}'\napi_key = 'abc'", {}, {}, "api_key"),
        ("command_rate = -1", {}, {}, "command_rate"),
        ("command_rate = nan", {}, {}, "command_rate"),
        ("max_connections_per_ip = -1", {}, {}, "max_connections_per_ip"),
        ("token_max_lifetime = inf", {}, {}, "token_max_lifetime"),
        ("trusted_proxies = ['not-a-net']", {}, {}, "trusted_proxies"),
        ("[namespaces.chat]\npublish = 'tokens'", {}, {}, "namespaces.chat.publish"),
        ("[namespaces.chat]\npublish_rate = -1", {}, {}, "namespaces.chat.publish_rate"),
        ("[namespaces.chat]\npublish_burst = -1", {}, {}, "namespaces.chat.publish_burst"),
        ("connect_proxy = 'ftp://backend/x'", {}, {}, "connect_proxy"),
        ("rpc_proxy = 'http://'", {}, {}, "rpc_proxy"),
        (
            "[namespaces.chat]\npublish_proxy = 'localhost:80'",
            {},
            {},
            "namespaces.chat.publish_proxy",
        ),
        ("[namespaces.chat]\nsubscribe_proxy = 5", {}, {}, "namespaces.chat.subscribe_proxy"),
        ("proxy_timeout = 0", {}, {}, "proxy_timeout"),
        ("proxy_timeout = nan", {}, {}, "proxy_timeout"),
        ("proxy_timeout = 3600", {}, {}, "proxy_timeout"),
        ("proxy_concurrency = 0", {}, {}, "proxy_concurrency"),
        ("proxy_headers = ['Bad Header']", {}, {}, "proxy_headers"),
        ("proxy_secret = 'short'", {}, {}, "proxy_secret"),
        # A proxy without a secret outside dev mode: the backend could not tell the hub's calls.
        (f"token_secret = '{SECRET}'\nrpc_proxy = 'http://b/rpc'", {}, {}, "proxy_secret"),
        ("[namespaces.chat]\nslow_consumer = 'sometimes'", {}, {}, "namespaces.chat.slow_consumer"),
        ("[namespaces.chat]\nslow_consumer = 1", {}, {}, "namespaces.chat.slow_consumer"),
        ("[namespaces.chat]\nslow_consumer = ['drop']", {}, {}, "namespaces.chat.slow_consumer"),
        ("[namespaces.chat]\nwrite_delay = -1", {}, {}, "namespaces.chat.write_delay"),
        ("[namespaces.chat]\nwrite_delay = nan", {}, {}, "namespaces.chat.write_delay"),
        ("[namespaces.chat]\nwrite_delay = 1e9", {}, {}, "namespaces.chat.write_delay"),
        ("[namespaces.chat]\nwrite_delay = 'soon'", {}, {}, "namespaces.chat.write_delay"),
        ("write_delay = -0.5", {}, {}, "write_delay"),
        ("write_delay = inf", {}, {}, "write_delay"),
        ("", {"HUB_WRITE_DELAY": "nan"}, {}, "write_delay"),
        ("", {"HUB_WRITE_DELAY": "soon"}, {}, "HUB_WRITE_DELAY"),
        ("", {}, {"write_delay": 1001}, "write_delay"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(
    tmp_path: Path, toml: str, env: dict[str, str], overrides: dict[str, Any], field: str
) -> None:
    path = write(tmp_path, toml) if toml else None
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env, overrides=overrides)
    message = str(caught.value)
    assert "\n" not in message
    assert field in message, message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "missing.toml", env={})
    assert "missing.toml" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.10", "example.com"])
def test_non_loopback_host_without_secret_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_serving(load_settings(None, env={}, overrides={"host": host}))
    assert "token_secret" in str(caught.value)
    assert "\n" not in str(caught.value)
    # Explicit dev mode on a network address is refused even with a secret.
    with pytest.raises(ConfigError):
        load_settings(None, env={}, overrides={"host": host, "insecure": True, "token_secret": "s"})
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={}, overrides={"host": host, "insecure": True})
    assert "token_secret" in str(caught.value)
    # With a secret (or a public key) it is fine and not in dev mode.
    s = load_settings(None, env={"HUB_TOKEN_SECRET": SECRET}, overrides={"host": host})
    assert not s.insecure
    s = load_settings(None, env={}, overrides={"host": host, "token_public_key": "PEM"})
    assert not s.insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_allow_dev_mode_when_asked(host: str) -> None:
    s = load_settings(None, env={}, overrides={"host": host, "insecure": True})
    assert s.insecure
    check_serving(s)
    with pytest.raises(ConfigError):
        check_serving(load_settings(None, env={}, overrides={"host": host}))


def test_make_settings_helper_never_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HUB_PORT", "not-a-port")
    assert make_settings().port == 0


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_api_key_is_refused(value: str) -> None:
    """A blank key would accept a blank X-API-Key header: a Secret or env file left unfilled."""
    with pytest.raises(ConfigError, match="api_key: must not be empty"):
        load_settings(None, env={"HUB_API_KEY": value})


def test_an_overridden_bad_value_is_not_an_error(tmp_path: Path) -> None:
    """Only the value in use is checked: a flag overrides a bad HUB_PORT, the environment a bad
    file value. The same bad value, when it is the one in use, still stops the hub."""
    s = load_settings(env={"HUB_PORT": "abc"}, overrides={"port": 18770})
    assert s.port == 18770
    path = write(tmp_path, 'port = "abc"\nmax_connections = "many"\n')
    s = load_settings(path, env={"HUB_MAX_CONNECTIONS": "5"}, overrides={"port": 9001})
    assert (s.port, s.max_connections) == (9001, 5)
    with pytest.raises(ConfigError, match="HUB_PORT"):
        load_settings(env={"HUB_PORT": "abc"})
    with pytest.raises(ConfigError, match="max_connections"):
        load_settings(path, env={}, overrides={"port": 9001})
    with pytest.raises(ConfigError, match="bogus: unknown setting"):  # unknown stays an error
        load_settings(write(tmp_path, "bogus = 1\n"), env={}, overrides={"port": 9001})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@10.0.0.1:6379", "redis://:***@10.0.0.1:6379"),
        ("rediss://hub:p%40ss@redis.example:6380/1", "rediss://hub:***@redis.example:6380/1"),
        (
            "redis+cluster://hub:pw@10.0.0.1:7000,10.0.0.2:7000",
            "redis+cluster://hub:***@10.0.0.1:7000,10.0.0.2:7000",
        ),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://hub@10.0.0.1:6379", "redis://hub@10.0.0.1:6379"),
        ("redis://u:p@ss@10.0.0.1", "redis://u:***@10.0.0.1"),
    ],
)
def test_the_ready_line_masks_redis_passwords(url: str, shown: str) -> None:
    s = load_settings(env={}, overrides={"redis_url": url, "insecure": True})
    assert summary(s) == f"broker: {shown}  auth: dev mode"
    assert "s3cret" not in summary(s) and "pw" not in summary(s).replace("password", "")


def test_a_connect_proxy_counts_as_credentials() -> None:
    settings = load_settings(
        None,
        env={},
        overrides={"connect_proxy": "http://127.0.0.1:9/c", "proxy_secret": SECRET},
    )
    check_serving(settings)
    assert "connect proxy" in summary(settings)


def test_the_ready_line_names_the_auth_mode() -> None:
    assert summary(load_settings(env={}, overrides={"insecure": True})) == (
        "broker: memory  auth: dev mode"
    )
    assert summary(load_settings(env={})) == "broker: memory  auth: none"  # serve refuses it
    s = load_settings(env={"HUB_TOKEN_SECRET": "x" * 32})
    assert summary(s) == "broker: memory  auth: jwt HS256"
    s = load_settings(env={"HUB_TOKEN_SECRET": "x" * 32, "HUB_TOKEN_ALGORITHMS": "HS256,HS512"})
    assert summary(s) == "broker: memory  auth: jwt HS256,HS512"
    s = load_settings(env={"HUB_TOKEN_SECRET": "x" * 32}, overrides={"insecure": True})
    assert summary(s) == "broker: memory  auth: jwt HS256 + dev mode"
