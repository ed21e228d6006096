"""Settings: flags override ``HUB_*`` environment variables, which override the TOML file.

Every bad value stops the process with one line that names the field, e.g.
``config error: port: expected an integer from 1 to 65535, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HubError
from .inbox import INBOX_SIZE, INBOX_TTL
from .rules import MIN_SECRET_BYTES
from .tokens import TokenVerifier

__all__ = [
    "SLOW_CONSUMER_POLICIES",
    "ConfigError",
    "Namespace",
    "Settings",
    "load_settings",
    "mask_url",
    "proxy_urls",
    "summary",
]

#: What a namespace's ``slow_consumer`` may say (hub.fanout carries them out).
SLOW_CONSUMER_POLICIES = ("close", "drop", "latest")
#: The longest ``write_delay``, in milliseconds: beyond it a push is late, not batched.
MAX_WRITE_DELAY = 1000.0


class ConfigError(HubError):
    """A setting is missing or wrong; the message names it."""


@dataclass(slots=True, frozen=True)
class Namespace:
    """Options for the channels ``<name>:...`` (the channel's part before the first colon).

    ``subscribe``: ``"any"`` lets every authenticated user subscribe; ``"token"`` only users
    whose token's ``channels`` claim matches. ``personal``: channel ``<name>:<user id>`` may be
    subscribed by that user only. ``history_size > 0``: each channel keeps its last
    ``history_size`` publications, dropped ``history_ttl`` seconds after its last publication
    (0: kept until pushed out by newer ones); clients can recover missed ones (hub.history).

    ``publish``: ``False`` (clients may not publish), ``True`` (who may subscribe may publish)
    or ``"token"`` (who may subscribe, and whose token's ``publish`` claim matches the
    channel). ``publish_rate`` / ``publish_burst``: a per-connection token bucket for publishes
    in this namespace, on top of the connection's command rate (0: no extra limit).

    ``subscribe_proxy`` / ``publish_proxy``: URLs of the backend that must also allow each
    subscription / publication here, and may replace a publication's data (docs/proxy.md).
    ``server_side``: a connection is subscribed at connect to the channels here its token's
    ``channels`` claim names exactly (no ``*``), and to its personal channel when ``personal``.
    ``slow_consumer``: what a subscriber past ``outbound_buffer`` gets on this namespace's
    channels: ``"close"`` (4000), ``"drop"`` (pushes skipped, then a gap notice) or ``"latest"``
    (the newest push per channel kept, after a gap notice). ``write_delay`` (ms): hold a
    connection's pushes of these channels that long and write them in one send (unset: the
    global ``write_delay``).
    """

    name: str = ""
    subscribe: str = "any"
    publish: bool | str = False
    publish_rate: float = 0.0
    publish_burst: int = 0
    personal: bool = False
    max_message_size: int = 65536
    history_size: int = 0
    history_ttl: float = 0.0
    presence: bool = False
    join_leave: bool = False
    subscribe_proxy: str | None = None
    publish_proxy: str | None = None
    server_side: bool = False
    slow_consumer: str = "close"
    write_delay: float | None = None


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    insecure: bool = False
    redis_url: str | None = None
    redis_prefix: str = "hub"
    redis_signing_key: str | None = None
    workers: int = 1
    token_secret: str | None = None
    token_public_key: str | None = None
    token_algorithms: list[str] = field(default_factory=lambda: ["HS256", "RS256", "ES256"])
    token_require_exp: bool = False
    token_max_lifetime: float = 0.0
    token_issuer: str | None = None
    token_audience: str | None = None
    api_key: str | None = None
    admin: bool = False
    metrics_key: str | None = None
    metrics_host: str | None = None
    metrics_port: int = 0
    allowed_origins: list[str] = field(default_factory=list)
    max_connections: int = 0
    max_connections_per_ip: int = 0
    command_rate: float = 100.0
    command_burst: int = 200
    auth_failures: int = 10
    auth_failure_window: float = 60.0
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1"])
    max_subscriptions: int = 128
    max_message_size: int = 65536
    max_channel_length: int = 255
    outbound_buffer: int = 1 << 20
    write_delay: float = 0.0
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    handshake_timeout: float = 10.0
    drain_seconds: float = 10.0
    presence_ttl: float = 60.0
    join_leave_interval: float = 0.5
    inbox_size: int = INBOX_SIZE
    inbox_ttl: float = INBOX_TTL
    fallback_url: str | None = None
    fallback_secret: str | None = None
    fallback_after: float = 0.0
    log_level: str = "info"
    connect_proxy: str | None = None
    rpc_proxy: str | None = None
    proxy_timeout: float = 5.0
    proxy_secret: str | None = None
    proxy_concurrency: int = 64
    proxy_headers: list[str] = field(
        default_factory=lambda: ["Authorization", "Origin", "User-Agent", "X-Forwarded-For"]
    )
    namespaces: dict[str, Namespace] = field(default_factory=dict)

    def namespace(self, channel: str) -> Namespace:
        """The options for ``channel``: its namespace's, or the default namespace's."""
        name, sep, _ = channel.partition(":")
        if sep:
            found = self.namespaces.get(name)
            if found is not None:
                return found
        return self.namespaces.get("", _DEFAULT_NS)

    @property
    def loopback(self) -> bool:
        host = self.host
        if host in ("localhost", ""):
            return host == "localhost"
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


_DEFAULT_NS = Namespace()
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_NS_FIELDS = {f.name: f for f in dataclasses.fields(Namespace)}


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Convert a TOML or environment value to the field's type, or raise naming the field."""
    kind = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return None
    try:
        if kind == "int":
            if isinstance(value, (bool, float)):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if kind == "list[str]":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported setting")


def _publish_mode(name: str, value: Any) -> bool | str:
    """``publish``: true, false or ``"token"`` (also as an environment-style string)."""
    if value == "token":
        return "token"
    try:
        return bool(_coerce(name, value, "bool"))
    except ConfigError:
        raise ConfigError(f"{name}: expected true, false or 'token', got {value!r}") from None


def _namespaces(raw: Any) -> dict[str, Namespace]:
    if not isinstance(raw, Mapping):
        raise ConfigError("namespaces: expected a table of tables")
    result = {}
    for ns_name, options in raw.items():
        where = f"namespaces.{ns_name}"
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}: expected a table")
        if ns_name == "":  # one spelling for the default namespace, so two cannot disagree
            raise ConfigError('namespaces."": the default namespace is [namespaces.default]')
        values: dict[str, Any] = {"name": "" if ns_name == "default" else ns_name}
        for key, value in options.items():
            f = _NS_FIELDS.get(key)
            if f is None or key == "name":
                raise ConfigError(f"{where}.{key}: unknown setting")
            if key == "publish":
                values[key] = _publish_mode(f"{where}.{key}", value)
                continue
            values[key] = _coerce(f"{where}.{key}", value, str(f.type))
        if values.get("subscribe", "any") not in ("any", "token"):
            raise ConfigError(f"{where}.subscribe: expected 'any' or 'token'")
        for key in ("max_message_size", "history_size", "history_ttl", "publish_rate"):
            if not values.get(key, 0) >= 0:  # NaN too
                raise ConfigError(f"{where}.{key}: must not be negative")
        if values.get("publish_burst", 0) < 0:
            raise ConfigError(f"{where}.publish_burst: must not be negative")
        if values.get("publish_rate", 0) == float("inf"):
            raise ConfigError(f"{where}.publish_rate: must be finite (0: no extra limit)")
        if values.get("history_ttl", 0) == float("inf"):
            raise ConfigError(f"{where}.history_ttl: must be finite (0 keeps history untimed)")
        policy = values.get("slow_consumer", "close")
        if policy not in SLOW_CONSUMER_POLICIES:
            raise ConfigError(f"{where}.slow_consumer: expected 'close', 'drop' or 'latest'")
        delay = values.get("write_delay")
        if delay is not None and not 0 <= delay <= MAX_WRITE_DELAY:  # NaN too
            raise ConfigError(
                f"{where}.write_delay: expected 0 to {MAX_WRITE_DELAY:g} milliseconds, got {delay}"
            )
        if ":" in values["name"]:
            raise ConfigError(f"{where}: a namespace name cannot contain ':'")
        for key in ("subscribe_proxy", "publish_proxy"):
            _check_proxy_url(f"{where}.{key}", values.get(key))
        result[values["name"]] = Namespace(**values)
    return result


def _check_proxy_url(name: str, url: str | None) -> None:
    if url is None:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http:// or https:// url, got {url!r}")


def proxy_urls(s: Settings) -> list[str]:
    """The proxy settings that are set, by name (``connect_proxy``, ``namespaces.x...``)."""
    names = [key for key in ("connect_proxy", "rpc_proxy") if getattr(s, key)]
    for ns in s.namespaces.values():
        where = f"namespaces.{ns.name or 'default'}"
        keys = ("subscribe_proxy", "publish_proxy")
        names += [f"{where}.{key}" for key in keys if getattr(ns, key)]
    return names


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from the file, then the environment, then explicit overrides (flags)."""
    env = os.environ if env is None else env
    # Each field's winning layer is found first and only that value is checked: a bad value that
    # a flag (or the environment) overrides is not in use, so it is not an error.
    raw: dict[str, tuple[str, Any]] = {}  # field -> (the name an error gives, the raw value)
    namespaces: dict[str, Namespace] | None = None
    path = config_file or env.get("HUB_CONFIG")
    if path:
        try:
            with Path(path).open("rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
        section = table.get("hub", table)
        for key, value in section.items():
            if key == "namespaces":
                namespaces = _namespaces(value)
                continue
            if key not in _FIELDS:
                raise ConfigError(f"{key}: unknown setting")
            raw[key] = (key, value)
    for key in _FIELDS:
        raw_env = env.get(f"HUB_{key.upper()}")
        if raw_env is not None and key != "namespaces":
            raw[key] = (f"HUB_{key.upper()}", raw_env)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"{key}: unknown setting")
        raw[key] = (f"--{key.replace('_', '-')}", value)
    values: dict[str, Any] = {
        key: _coerce(name, value, str(_FIELDS[key].type)) for key, (name, value) in raw.items()
    }
    if namespaces is not None:
        values["namespaces"] = namespaces
    settings = Settings(**values)
    validate(settings)
    return settings


def _check_secret(key: str, value: str | None, why: str = "") -> None:
    """The one length rule for secrets (``rules.MIN_SECRET_BYTES``), worded once."""
    if value is not None and len(value.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{key}: must be at least {MIN_SECRET_BYTES} bytes{why} "
            f"(got {len(value.encode())}); e.g. openssl rand -hex 32"
        )


def check_serving(s: Settings) -> None:
    """What ``hub serve`` (and every :class:`~hub.app.Hub`) needs on top of :func:`validate`:
    credentials, or dev mode chosen on purpose. Dev mode never turns itself on, since behind a
    reverse proxy on the same host a loopback address is no protection at all."""
    if not s.insecure and not (s.token_secret or s.token_public_key or s.connect_proxy):
        raise ConfigError(
            "token_secret: no credentials configured; set HUB_TOKEN_SECRET (or token_secret / "
            "token_public_key), or pass --insecure (HUB_INSECURE=1) for dev mode on loopback"
        )


def validate(s: Settings) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"port: expected an integer from 0 to 65535, got {s.port}")
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError(
            f"metrics_port: expected an integer from 0 to 65535, got {s.metrics_port}"
        )
    if s.metrics_host is not None and not s.metrics_port:
        raise ConfigError("metrics_host: needs metrics_port (a listener of its own for /metrics)")
    if s.workers < 1:
        raise ConfigError(f"workers: must be at least 1, got {s.workers}")
    if s.workers > 1 and not s.redis_url:
        raise ConfigError("workers: more than one worker needs redis_url (--redis) to join them")
    for key in (
        "max_connections",
        "max_connections_per_ip",
        "max_subscriptions",
        "max_message_size",
        "outbound_buffer",
        "command_burst",
        "auth_failures",
    ):
        if getattr(s, key) < 0:
            raise ConfigError(f"{key}: must not be negative")
    if s.api_key is not None and not s.api_key.strip():
        # An empty key would match an empty X-API-Key header: a Secret or env file left blank.
        raise ConfigError("api_key: must not be empty (leave it unset to turn the http api off)")
    if s.admin and not s.api_key:
        raise ConfigError("admin: the admin page needs api_key (it is behind the api key)")
    for key in ("command_rate", "auth_failure_window", "token_max_lifetime"):
        value = getattr(s, key)
        if not 0 <= value < float("inf"):  # NaN too
            raise ConfigError(f"{key}: expected a finite number >= 0, got {value}")
    for network in s.trusted_proxies:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: not an address or network: {network!r}") from None
    if not s.insecure:
        for key in ("token_secret", "api_key"):
            _check_secret(key, getattr(s, key), " outside dev mode")
    if s.outbound_buffer < 1024:
        raise ConfigError("outbound_buffer: must be at least 1024 bytes")
    if not 0 <= s.write_delay <= MAX_WRITE_DELAY:  # NaN too
        raise ConfigError(
            f"write_delay: expected 0 to {MAX_WRITE_DELAY:g} milliseconds, got {s.write_delay}"
        )
    if s.redis_url is not None and not s.redis_url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://")
    ):
        raise ConfigError(
            f"redis_url: expected redis://, unix:// or redis+cluster://, got {s.redis_url!r}"
        )
    _check_secret("redis_signing_key", s.redis_signing_key)
    for key, most in (("ping_interval", 3600), ("ping_timeout", 3600), ("handshake_timeout", 300)):
        value = getattr(s, key)
        if not 0 < value <= most:  # NaN too
            raise ConfigError(f"{key}: expected 0 < seconds <= {most}, got {value}")
    if not 0 <= s.drain_seconds <= 3600:
        raise ConfigError(f"drain_seconds: expected 0 to 3600 seconds, got {s.drain_seconds}")
    if not 1.0 <= s.presence_ttl <= 86400:
        raise ConfigError(f"presence_ttl: expected 1 to 86400 seconds, got {s.presence_ttl}")
    if not 0.0 <= s.join_leave_interval <= 60:
        raise ConfigError(
            f"join_leave_interval: expected 0 to 60 seconds, got {s.join_leave_interval}"
        )
    if not 1 <= s.inbox_size <= 100_000:
        raise ConfigError(f"inbox_size: expected 1 to 100000 entries, got {s.inbox_size}")
    if not 1.0 <= s.inbox_ttl <= 90 * 86400:
        raise ConfigError(f"inbox_ttl: expected 1 to 7776000 seconds, got {s.inbox_ttl}")
    if not 0.0 <= s.fallback_after <= s.inbox_ttl:
        raise ConfigError(f"fallback_after: expected 0 to inbox_ttl, got {s.fallback_after}")
    if s.fallback_url is not None:
        if not s.fallback_url.startswith(("http://", "https://")):
            raise ConfigError(f"fallback_url: expected http:// or https://, got {s.fallback_url!r}")
        if s.fallback_secret is None:
            raise ConfigError("fallback_secret: fallback_url needs one (the webhook is signed)")
        _check_secret("fallback_secret", s.fallback_secret)
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {s.log_level!r}")
    _validate_proxies(s)
    if s.insecure and not s.loopback:
        raise ConfigError(
            f"token_secret: required to listen on {s.host!r} (dev mode without auth is for "
            "loopback addresses only); set HUB_TOKEN_SECRET or token_public_key"
        )


def _validate_proxies(s: Settings) -> None:
    """The proxies' settings (docs/proxy.md). Outside dev mode a proxy needs ``proxy_secret``:
    a backend that cannot tell the hub's calls from anyone's would trust whoever calls it."""
    for key in ("connect_proxy", "rpc_proxy"):
        _check_proxy_url(key, getattr(s, key))
    if not 0 < s.proxy_timeout <= 60:  # NaN too
        raise ConfigError(f"proxy_timeout: expected 0 < seconds <= 60, got {s.proxy_timeout}")
    if not 1 <= s.proxy_concurrency <= 10000:
        raise ConfigError(f"proxy_concurrency: expected 1 to 10000, got {s.proxy_concurrency}")
    for header in s.proxy_headers:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", header):
            raise ConfigError(f"proxy_headers: not a header name: {header!r}")
    _check_secret("proxy_secret", s.proxy_secret)
    if not s.insecure and s.proxy_secret is None and proxy_urls(s):
        raise ConfigError(
            f"proxy_secret: {proxy_urls(s)[0]} is set; the backend needs proxy_secret to check "
            "that calls come from the hub (docs/proxy.md)"
        )


def mask_url(url: str) -> str:
    """``url`` fit for a log line: a password in it (``user:pw@`` or ``?password=``) is masked."""
    url = re.sub(r"(//[^/@:]*:)[^/?#]*@", r"\1***@", url)  # up to the last @: p@ss too
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def summary(s: Settings) -> str:
    """What the ready line says besides the URL: the broker in use and the auth mode, so a log
    shows at once whether processes are joined and whether connections need a token."""
    broker = mask_url(s.redis_url) if s.redis_url else "memory"
    modes = []
    if s.token_secret or s.token_public_key:
        verifier = TokenVerifier(s.token_secret, s.token_public_key, s.token_algorithms)
        modes.append("jwt " + ",".join(verifier.algorithms))
    if s.connect_proxy:
        modes.append("connect proxy")
    if s.insecure:
        modes.append("dev mode")
    return f"broker: {broker}  auth: {' + '.join(modes) or 'none'}"
