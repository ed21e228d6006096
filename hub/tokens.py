"""Connection tokens: JWTs (HS256 with a shared secret, RS256/ES256 with a public key).

Claims: ``sub`` is the user id (required), ``exp`` is enforced when present, ``channels`` is an
optional list of channel patterns (``*`` matches any run of characters) the user may subscribe
to in namespaces set to ``subscribe = "token"``, and ``info`` is free-form data shown in presence.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import HubError

__all__ = ["Credentials", "TokenError", "TokenExpired", "TokenVerifier", "mint_token"]


class TokenError(HubError):
    """The token is missing, malformed, or its signature does not verify."""


class TokenExpired(TokenError):
    """The token's ``exp`` is in the past."""


@dataclass(slots=True, frozen=True)
class Credentials:
    user: str
    channels: tuple[str, ...] | None = None
    expires_at: float | None = None
    info: Any = None

    def may_subscribe(self, channel: str) -> bool:
        """True when the token's ``channels`` claim has a pattern matching ``channel``."""
        if self.channels is None:
            return False
        return any(fnmatch.fnmatchcase(channel, pattern) for pattern in self.channels)


class TokenVerifier:
    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        algorithms: list[str] | None = None,
    ) -> None:
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
                    token, key, algorithms=algorithms, options={"require": ["sub"]}, leeway=5
                )
            except jwt.ExpiredSignatureError:
                raise TokenExpired("token expired") from None
            except jwt.PyJWTError as exc:
                raise TokenError(f"invalid token: {exc}") from None
            return _credentials(claims)
        raise TokenError(f"unsupported token algorithm: {alg}")


def _credentials(claims: dict[str, Any]) -> Credentials:
    user = claims.get("sub")
    if not isinstance(user, str) or not user:
        raise TokenError("invalid token: sub must be a non-empty string")
    channels = claims.get("channels")
    if channels is not None:
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise TokenError("invalid token: channels must be a list of strings")
        channels = tuple(channels)
    exp = claims.get("exp")
    return Credentials(user, channels, float(exp) if exp is not None else None, claims.get("info"))


def mint_token(
    user: str,
    secret: str,
    *,
    ttl: float | None = 3600,
    channels: list[str] | None = None,
    info: Any = None,
    algorithm: str = "HS256",
) -> str:
    """Sign a token (for development, tests, and backends written in Python)."""
    claims: dict[str, Any] = {"sub": user, "iat": int(time.time())}
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    if channels is not None:
        claims["channels"] = channels
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm=algorithm)
