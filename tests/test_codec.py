"""hub.codec: the JSON written to clients and the check on published data.

``json_bytes`` (orjson, yielding to the standard library where the two differ) must decode to
exactly what the standard library's strict encoder writes, and refuse what it refuses, for
every value that can reach a push: what msgpack decodes and what ``check_data`` admits.
Checked on generated values and on the cases where orjson and the standard library part ways.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.codec import check_data, json_bytes
from hub.errors import BadRequest

STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def strict(obj: Any) -> str | None:
    try:
        return STRICT.encode(obj)
    except (TypeError, ValueError, RecursionError):
        return None


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and the infinities too
    | st.text()
    | st.binary(max_size=4)
)
keys = st.text() | st.integers(min_value=-5, max_value=5) | st.binary(max_size=2)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_json_bytes_agrees_with_the_strict_encoder(obj: Any) -> None:
    expected = strict(obj)
    got = json_bytes(obj)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert json.loads(got.decode("utf-8")) == json.loads(expected)


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"data": {"u": 1, "r": 2}}, b'{"data":{"u":1,"r":2}}'),
        ({"a": None}, b'{"a":null}'),  # null is written, through the strict encoder
        ({"a": math.nan}, None),  # orjson would write null: refused, as by the strict encoder
        ({"a": [1, math.inf]}, None),
        ({1: "x"}, b'{"1":"x"}'),  # integer keys as the standard library writes them
        ({"n": 2**64}, b'{"n":18446744073709551616}'),
        ({"b": b"x"}, None),
        ({"t": datetime.datetime(2026, 1, 1)}, None),  # no type JSON lacks sneaks through
        ({"p": Point(1)}, None),
        ({"l": Level.HIGH}, b'{"l":3}'),
        ({"s": "é\u2028🙂"}, '{"s":"é\u2028🙂"}'.encode()),
    ],
)
def test_json_bytes_where_orjson_and_the_standard_library_differ(
    obj: Any, expected: bytes | None
) -> None:
    assert json_bytes(obj) == expected


def test_deep_nesting_goes_to_the_strict_encoder() -> None:
    deep: Any = 1
    for _ in range(300):  # deeper than orjson's limit, within the standard library's
        deep = [deep]
    got = json_bytes(deep)
    assert got is not None and json.loads(got) == deep


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (2**64, "integer out of 64-bit range"),
        ({"a": [-(2**63) - 1]}, "integer out of 64-bit range"),
        (datetime.date(2026, 1, 1), "unsupported type"),
        ({"x": object()}, "unsupported type"),
        # json_bytes would write these two (orjson knows them); they never get that far.
        ([Color.RED], "unsupported type"),
        (uuid.UUID(int=1), "unsupported type"),
        ("\ud800", "unpaired surrogate in a string"),
    ],
)
def test_check_data_refuses_what_cannot_cross_redis(data: Any, reason: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_data(data)
    assert info.value.message == f"data cannot be encoded: {reason}"


@pytest.mark.parametrize("data", [None, 2**64 - 1, -(2**63), "é", b"\x00", [1.5, {"k": math.nan}]])
def test_check_data_takes_what_msgpack_carries(data: Any) -> None:
    check_data(data)
