"""Connection tokens: JWTs (HS256 with a shared secret, RS256/ES256 with a public key).

Claims: ``sub`` is the user id (required), ``exp`` is enforced when present (and required with
``require_exp`` or ``max_lifetime``), ``iss`` / ``aud`` are checked when an issuer / audience is
configured, ``channels`` is an optional list of channel patterns (``*`` matches any run of
characters) the user may subscribe to in namespaces set to ``subscribe = "token"``, ``publish``
the same for namespaces set to ``publish = "token"``, and ``info`` is free-form data shown in
presence and in the ``from`` of the user's publications. A subscription token (docs/proxy.md)
also has ``channel``, the one channel it grants.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import HubError
from .rules import MAX_USER_LENGTH, info_problem, user_problem

__all__ = ["Credentials", "TokenError", "TokenExpired", "TokenVerifier", "mint_token"]


class TokenError(HubError):
    """The token is missing, malformed, or its signature does not verify."""


class TokenExpired(TokenError):
    """The token's ``exp`` is in the past."""


#: The latest ``exp`` taken (the end of year 9999): anything later is not a time but an attempt
#: to overflow whatever computes with it.
MAX_EXP = 253402300799


@dataclass(slots=True, frozen=True)
class Credentials:
    user: str
    channels: tuple[str, ...] | None = None
    expires_at: float | None = None
    info: Any = None
    publish: tuple[str, ...] | None = None
    #: The token's ``device`` claim: whose acknowledgements an inbox keeps (hub.notify).
    device: str | None = None
    channel: str | None = None  # a subscription token's channel (docs/proxy.md)

    def may_subscribe(self, channel: str) -> bool:
        """True when the token's ``channels`` claim has a pattern matching ``channel``."""
        return _matches(self.channels, channel)

    def may_publish(self, channel: str) -> bool:
        """True when the token's ``publish`` claim has a pattern matching ``channel``."""
        return _matches(self.publish, channel)


def _matches(patterns: tuple[str, ...] | None, channel: str) -> bool:
    if patterns is None:
        return False
    return any(fnmatch.fnmatchcase(channel, pattern) for pattern in patterns)


class TokenVerifier:
    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        algorithms: list[str] | None = None,
        *,
        require_exp: bool = False,
        max_lifetime: float = 0.0,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        """``max_lifetime > 0``: refuse tokens valid for longer (``exp`` minus ``iat``, or minus
        now without ``iat``), which implies ``require_exp``: a stolen token stops working soon."""
        self.max_lifetime = max_lifetime
        self.issuer = issuer
        self.audience = audience
        self._require = ["sub", "exp"] if require_exp or max_lifetime > 0 else ["sub"]
        if secret is None and public_key is None:
            raise ValueError("a token secret or public key is required")
        algorithms = algorithms or ["HS256", "RS256", "ES256"]
        # A key decides its algorithm family: never accept HS256 signed with a public key.
        self._keys: list[tuple[str, list[str]]] = []
        if secret is not None:
            hs = [a for a in algorithms if a.startswith("HS")]
            if hs:
                self._keys.append((secret, hs))
        if public_key is not None:
            asym = [a for a in algorithms if not a.startswith("HS")]
            if asym:
                self._keys.append((public_key, asym))

    @property
    def algorithms(self) -> list[str]:
        """The algorithms a token may be signed with, given the configured keys."""
        return [a for _, algorithms in self._keys for a in algorithms]

    def verify(self, token: str) -> Credentials:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        alg = header.get("alg")
        for key, algorithms in self._keys:
            if alg not in algorithms:
                continue
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    options={"require": self._require},
                    leeway=5,
                    issuer=self.issuer,
                    audience=self.audience,
                )
            except jwt.ExpiredSignatureError:
                raise TokenExpired("token expired") from None
            except jwt.PyJWTError as exc:
                raise TokenError(f"invalid token: {exc}"[:200]) from None
            except (OverflowError, ValueError, TypeError):  # claims PyJWT computes with
                raise TokenError("invalid token: a time claim is out of range") from None
            credentials = _credentials(claims)
            self._check_lifetime(credentials, claims.get("iat"))
            return credentials
        raise TokenError(f"unsupported token algorithm: {alg}"[:100])

    def _check_lifetime(self, credentials: Credentials, iat: Any) -> None:
        cap = self.max_lifetime
        if cap <= 0 or credentials.expires_at is None:
            return
        start = time.time()
        if _number(iat) and iat <= start + 5:  # a future iat would stretch the lifetime
            start = float(iat)
        if credentials.expires_at - start > cap + 5:
            raise TokenError(f"invalid token: valid for longer than {cap:g} seconds")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise TokenError(f"invalid token: {name} must be a list of strings")
    return tuple(value)


def _credentials(claims: dict[str, Any]) -> Credentials:
    user = claims.get("sub")
    if user_problem(user) is not None:
        raise TokenError(f"invalid token: sub must be a string of 1 to {MAX_USER_LENGTH} chars")
    exp = claims.get("exp")
    if exp is not None and not (_number(exp) and -MAX_EXP <= exp <= MAX_EXP):
        raise TokenError("invalid token: exp is out of range")
    info = claims.get("info")
    problem = info_problem(info)  # it reaches every subscriber in presence, join/leave, "from"
    if problem is not None:
        raise TokenError(f"invalid token: {problem}")
    device = claims.get("device")
    if device is not None and (
        not isinstance(device, str) or not 0 < len(device) <= 64 or not device.isprintable()
    ):
        raise TokenError("invalid token: device must be a string of 1 to 64 characters")
    channel = claims.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise TokenError("invalid token: channel must be a string")
    return Credentials(
        user,
        _patterns(claims, "channels"),
        None if exp is None else float(exp),
        info,
        _patterns(claims, "publish"),
        device,
        channel,
    )


def mint_token(
    user: str,
    secret: str,
    *,
    ttl: float | None = 3600,
    channels: list[str] | None = None,
    publish: list[str] | None = None,
    info: Any = None,
    algorithm: str = "HS256",
    **claims_: Any,
) -> str:
    """Sign a token (for development, tests, and backends written in Python); ``claims_`` are
    added as they are (``iss``, ``aud``...)."""
    claims: dict[str, Any] = {"sub": user, "iat": int(time.time()), **claims_}
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    if channels is not None:
        claims["channels"] = channels
    if publish is not None:
        claims["publish"] = publish
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm=algorithm)
