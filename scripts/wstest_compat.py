"""Python 3 shims for the converted autobahntestsuite; ``wstest_setup.py`` copies this file in.

Why it exists: the suite's cases were written for Python 2, where a plain literal is a byte string.
After 2to3 those literals are ``str``. The cases keep working on them as text holding one code point
per octet (so slicing and concatenation mean what they meant), and these helpers turn them into
real bytes only at the edges: on the wire, when expected and received events are compared, and
when a report is written. Inside the suite this module is ``autobahntestsuite._hubcompat``; it also
stands in for the few ``binascii`` functions the suite calls, which returned ``str`` in Python 2.
"""

from __future__ import annotations

import binascii as _binascii
from collections.abc import Callable
from typing import Any


def tobytes(value: Any) -> Any:
    """A Python-2 byte string (``str``, one code point per octet) as ``bytes``; others unchanged.

    A ``str`` with a code point above 255 was a ``unicode`` literal in Python 2, which the suite
    sent as UTF-8.
    """
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            return value.encode("utf-8")
    return value


def totext(value: Any) -> Any:
    """Octets as report text: UTF-8 where they are, else latin-1, so no octet is lost."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return value


def _map_leaves(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply ``leaf`` to every non-container value, keeping tuples, lists and dicts as they are."""
    if isinstance(obj, tuple):
        return tuple(_map_leaves(x, leaf) for x in obj)
    if isinstance(obj, list):
        return [_map_leaves(x, leaf) for x in obj]
    if isinstance(obj, dict):
        return {_map_leaves(k, leaf): _map_leaves(v, leaf) for k, v in obj.items()}
    return leaf(obj)


def _as_octets(value: Any) -> Any:
    return tobytes(value) if isinstance(value, str | bytes | bytearray | memoryview) else value


def _same(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types, as comparing two pickles was in Python 2."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def events_equal(expected: Any, received: Any) -> bool:
    """``Case.compare``: literals in the cases are ``str``, frames off the wire are ``bytes``."""
    return _same(_map_leaves(expected, _as_octets), _map_leaves(received, _as_octets))


def jsonable(obj: Any) -> Any:
    """A case result with every byte string turned into text, so ``json.dumps`` takes it."""
    return _map_leaves(obj, totext)


def b2a_hex(data: Any) -> str:
    """``binascii.b2a_hex`` taking Python-2 byte strings and returning ``str``, as it did there."""
    return _binascii.b2a_hex(tobytes(data)).decode("ascii")


def a2b_hex(data: Any) -> bytes:
    return _binascii.a2b_hex(data)


hexlify = b2a_hex
unhexlify = a2b_hex
