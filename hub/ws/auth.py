"""HTTP Basic authentication (RFC 7617) for the opening handshake."""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import http
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .connection import ServerConnection
from .http11 import Request, Response

__all__ = ["BasicAuth", "basic_auth"]

CheckCredentials = Callable[[str, str], "bool | Awaitable[bool]"]


def _parse_authorization(header: str) -> tuple[str, str] | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


class BasicAuth:
    """Enforces Basic auth. Use it as ``process_request=basic_auth(...)``, or as a decorator on
    the connection handler (``@basic_auth("user", "password")``), which installs the same check in
    the handshake of any server that runs that handler."""

    def __init__(self, realm: str, check: Callable[[str, str], Awaitable[bool]]) -> None:
        self.realm = realm
        self.check = check

    def _challenge(self, connection: ServerConnection, text: str) -> Response:
        response = connection.respond(http.HTTPStatus.UNAUTHORIZED, text)
        realm = self.realm.replace("\\", "\\\\").replace('"', '\\"')
        response.headers["WWW-Authenticate"] = f'Basic realm="{realm}", charset="UTF-8"'
        return response

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        values = request.headers.get_all("Authorization")
        if not values:
            return self._challenge(connection, "missing credentials\n")
        credentials = _parse_authorization(values[0]) if len(values) == 1 else None
        if credentials is None:
            return self._challenge(connection, "unsupported credentials\n")
        username, password = credentials
        if not await self.check(username, password):
            return self._challenge(connection, "invalid credentials\n")
        connection.username = username
        return None

    def __call__(self, *args: Any) -> Any:
        if len(args) == 1 and callable(args[0]):  # decorator on a handler
            handler = args[0]

            @functools.wraps(handler)
            async def wrapper(*a: Any, **kw: Any) -> Any:
                return await handler(*a, **kw)

            wrapper._hub_process_request = self.process_request  # type: ignore[attr-defined]
            return wrapper
        return self.process_request(*args)


def _is_pair(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, str) for x in value)


def basic_auth(
    *args: str,
    realm: str = "",
    credentials: tuple[str, str] | Iterable[tuple[str, str]] | None = None,
    check_credentials: CheckCredentials | None = None,
) -> BasicAuth:
    """Build a Basic auth check from fixed ``credentials`` or a ``check_credentials`` callable.

    ``basic_auth("user", "password", realm=...)`` is the short form for one pair. Passwords are
    compared in constant time.
    """
    if args:
        if len(args) != 2 or credentials is not None or check_credentials is not None:
            raise TypeError("pass basic_auth(username, password) or keyword arguments")
        credentials = (args[0], args[1])
    if (credentials is None) == (check_credentials is None):
        raise ValueError("provide either credentials or check_credentials")
    if credentials is not None:
        pairs: list[tuple[str, str]]
        if _is_pair(credentials):
            pairs = [credentials]  # type: ignore[list-item]
        elif isinstance(credentials, Iterable) and not isinstance(credentials, (str, bytes)):
            pairs = list(credentials)
            if not all(_is_pair(p) for p in pairs):
                raise TypeError(f"invalid credentials argument: {credentials}")
        else:
            raise TypeError(f"invalid credentials argument: {credentials}")
        table = {u.encode(): p.encode() for u, p in pairs}

        async def check(username: str, password: str) -> bool:
            expected = table.get(username.encode())
            if expected is None:
                hmac.compare_digest(password.encode(), password.encode())  # same work either way
                return False
            return hmac.compare_digest(password.encode(), expected)

        return BasicAuth(realm or "websocket", check)

    user_check = check_credentials

    async def check_any(username: str, password: str) -> bool:
        result = user_check(username, password)  # type: ignore[misc]
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    return BasicAuth(realm or "websocket", check_any)
