"""HTTP headers: a case-insensitive multi-map, and the parsers for the WebSocket header grammars
(comma-separated tokens, ``Sec-WebSocket-Extensions`` with parameters; RFC 7230 section 3.2.6)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from .exceptions import InvalidHeaderFormat

__all__ = ["Headers", "HeadersLike", "MultipleValuesError", "parse_extensions", "parse_tokens"]


#: Header names that most requests carry: parsed requests share these string objects (http11),
#: and their lower case is looked up instead of made again on every comparison.
COMMON_NAMES = [
    "Host", "Upgrade", "Connection", "Origin", "User-Agent", "Authorization", "Cookie",
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol", "Accept-Encoding", "Accept-Language", "Cache-Control", "Pragma",
    "Content-Type", "Content-Length", "Accept", "X-Forwarded-For", "X-Real-IP",
]  # fmt: skip
_LOWER = {n: n.lower() for n in COMMON_NAMES} | {n.lower(): n.lower() for n in COMMON_NAMES}


class MultipleValuesError(LookupError):
    """``headers[name]`` is ambiguous because the header appears more than once."""


class Headers:
    """Case-insensitive multi-map that keeps the order and spelling of the headers it holds.

    ``headers[name]`` returns the single value (``KeyError`` when absent, ``MultipleValuesError``
    when repeated); ``get_all(name)`` returns every value; ``headers[name] = value`` appends.
    A plain list of pairs underneath: requests carry a dozen headers, and every connection keeps
    its request, so a scan beats the memory of an index.
    """

    __slots__ = ("_list",)

    def __init__(self, *args: HeadersLike, **kwargs: str) -> None:
        self._list: list[tuple[str, str]] = []
        self.update(*args, **kwargs)

    def __str__(self) -> str:
        return "".join(f"{k}: {v}\r\n" for k, v in self._list) + "\r\n"

    def __repr__(self) -> str:
        return f"Headers({self._list!r})"

    def copy(self) -> Headers:
        return Headers(self._list)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        lower = key.lower()
        known = _LOWER.get
        return any((known(k) or k.lower()) == lower for k, _ in self._list)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> list[str]:
        names: dict[str, str] = {}
        for k, _ in self._list:
            names.setdefault(k.lower(), k.lower())
        return list(names)

    def __getitem__(self, key: str) -> str:
        values = self.get_all(key)
        if len(values) == 1:
            return values[0]
        if not values:
            raise KeyError(key)
        raise MultipleValuesError(key)

    def get(self, key: str, default: str | None = None) -> str | None:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: str) -> None:
        self._list.append((key, value))

    def __delitem__(self, key: str) -> None:
        lower = key.lower()
        if key not in self:
            raise KeyError(key)
        self._list = [(k, v) for k, v in self._list if k.lower() != lower]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return sorted((k.lower(), v) for k, v in self._list) == sorted(
            (k.lower(), v) for k, v in other._list
        )

    def clear(self) -> None:
        self._list.clear()

    def update(self, *args: HeadersLike, **kwargs: str) -> None:
        for arg in args:
            for key, value in _pairs(arg):
                self[key] = value
        for key, value in kwargs.items():
            self[key] = value

    def get_all(self, key: str) -> list[str]:
        lower = key.lower()
        # Names of parsed requests are interned (http11): their lower case is a lookup, not a
        # new string per header per call (a handshake looks up a dozen names).
        known = _LOWER.get
        return [v for k, v in self._list if (known(k) or k.lower()) == lower]

    def keys(self) -> Iterable[str]:
        return [k for k, _ in self._list]

    def items(self) -> Iterable[tuple[str, str]]:
        return list(self._list)

    raw_items = items

    def serialize(self) -> bytes:
        return str(self).encode()


HeadersLike = Headers | Mapping[str, str] | Iterable[tuple[str, str]]


def _pairs(headers: HeadersLike) -> Iterable[tuple[str, str]]:
    if isinstance(headers, Headers):
        return headers.raw_items()
    if isinstance(headers, Mapping):
        return headers.items()
    return headers


# RFC 7230 token and quoted-string.
_TOKEN = re.compile(r"[-!#$%&\'*+.^_`|~0-9a-zA-Z]+")
_QUOTED = re.compile(r'"(?:[\x09\x20-\x21\x23-\x5b\x5d-\x7e]|\\[\x09\x20-\x7e\x80-\xff])*"')
_OWS = re.compile(r"[\t ]*")


def _skip_ows(header: str, pos: int) -> int:
    match = _OWS.match(header, pos)
    assert match is not None
    return match.end()


def _token(header: str, pos: int, name: str) -> tuple[str, int]:
    match = _TOKEN.match(header, pos)
    if match is None:
        raise InvalidHeaderFormat(name, "expected token", header, pos)
    return match.group(), match.end()


def _expect(header: str, pos: int, char: str, name: str) -> int:
    if header[pos : pos + 1] != char:
        raise InvalidHeaderFormat(name, f"expected '{char}'", header, pos)
    return pos + 1


def _list(header: str, name: str, parse_item) -> list:  # type: ignore[no-untyped-def]
    """Parse ``#rule`` lists: empty elements are allowed and skipped (RFC 7230 7)."""
    items = []
    pos = 0
    while True:
        pos = _skip_ows(header, pos)
        while header[pos : pos + 1] == ",":
            pos = _skip_ows(header, pos + 1)
        if pos == len(header):
            return items
        item, pos = parse_item(header, pos, name)
        items.append(item)
        pos = _skip_ows(header, pos)
        if pos == len(header):
            return items
        pos = _expect(header, pos, ",", name)


def parse_tokens(header: str, name: str) -> list[str]:
    """Parse a comma-separated list of tokens (``Connection``, ``Sec-WebSocket-Protocol``)."""
    return _list(header, name, _token)


def parse_upgrade(header: str, name: str) -> list[str]:
    """Parse ``Upgrade``: protocols are ``token ["/" token]``."""

    def item(h: str, pos: int, n: str) -> tuple[str, int]:
        value, pos = _token(h, pos, n)
        if h[pos : pos + 1] == "/":
            version, pos = _token(h, pos + 1, n)
            value = f"{value}/{version}"
        return value, pos

    return _list(header, name, item)


ExtensionParams = list[tuple[str, str | None]]


def parse_extensions(header: str, name: str) -> list:
    """Parse ``Sec-WebSocket-Extensions`` into ``[(extension, [(param, value | None), ...])]``."""

    def param(h: str, pos: int) -> tuple[tuple[str, str | None], int]:
        key, pos = _token(h, pos, name)
        pos = _skip_ows(h, pos)
        value: str | None = None
        if h[pos : pos + 1] == "=":
            pos = _skip_ows(h, pos + 1)
            if h[pos : pos + 1] == '"':
                match = _QUOTED.match(h, pos)
                if match is None:
                    raise InvalidHeaderFormat(name, "expected quoted string", h, pos)
                value = re.sub(r"\\(.)", r"\1", match.group()[1:-1])
                pos = match.end()
                if _TOKEN.fullmatch(value) is None:  # RFC 6455 9.1: quoted values are tokens
                    raise InvalidHeaderFormat(name, "invalid quoted value", h, pos)
            else:
                value, pos = _token(h, pos, name)
        return (key, value), pos

    def item(h: str, pos: int, n: str) -> tuple[tuple[str, ExtensionParams], int]:
        ext, pos = _token(h, pos, n)
        params: ExtensionParams = []
        while True:
            pos = _skip_ows(h, pos)
            if h[pos : pos + 1] != ";":
                return (ext, params), pos
            pos = _skip_ows(h, pos + 1)
            p, pos = param(h, pos)
            params.append(p)

    return _list(header, name, item)


def build_extensions(extensions: Iterable[tuple[str, ExtensionParams]]) -> str:
    return ", ".join(
        "; ".join([ext] + [k if v is None else f"{k}={v}" for k, v in params])
        for ext, params in extensions
    )
