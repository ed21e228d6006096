"""The input rules every surface shares: client commands (``hub.session``), the HTTP API
(``hub.http_api``) and the Redis control messages and publishers (``hub.redis.wire``,
``hub.redis.publisher``).

Each rule lives here once, so the same input gets the same answer wherever it comes in: a
channel name the HTTP API takes is one a client may subscribe to, and a disconnect the
publisher SDK accepts is one every hub process carries out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgpack

from .errors import BadRequest, CloseCode

if TYPE_CHECKING:
    from .config import Namespace
    from .history import HistoryPage

__all__ = [
    "DISCONNECT_CODE",
    "MAX_EPOCH_LENGTH",
    "MAX_INFO_BYTES",
    "MAX_REASON_BYTES",
    "MAX_USER_LENGTH",
    "MIN_SECRET_BYTES",
    "check_channel",
    "check_user",
    "close_problem",
    "disconnect_problem",
    "history_limit",
    "history_result",
    "info_problem",
    "parse_history",
    "parse_since",
    "user_problem",
]

_CHANNEL = re.compile(r"[A-Za-z0-9_\-.:@/=,+]+")
#: The close code of a disconnect that names none: the backend disconnected the user for good.
DISCONNECT_CODE = int(CloseCode.DISCONNECTED)
#: A WebSocket close reason must fit a 125-byte control frame with its 2-byte code.
#: Fewest bytes of any secret the hub keys an HMAC with or checks callers against (token
#: secret, API key, Redis signing key, proxy and fallback secrets): shorter ones can be guessed
#: offline from one signed message, or online key after key.
MIN_SECRET_BYTES = 32

MAX_REASON_BYTES = 120
#: Epochs the hub makes have 8 characters; ``since.epoch`` from clients may have up to 64.
MAX_EPOCH_LENGTH = 64
#: Characters of a user id: a token's ``sub``, a connect proxy's ``user``, the HTTP API's and
#: the publishers' ``user``, a publication's ``from.user``. It names Redis channels and keys and
#: is copied into presence and every ``from``, so it stays short.
MAX_USER_LENGTH = 200
#: Bytes (msgpack) of a connection's or subscriber's ``info``: it is copied into presence, every
#: join/leave and the ``from`` of each publication, so one backend answer cannot make them huge.
MAX_INFO_BYTES = 4096


def check_channel(channel: Any, max_length: int) -> str:
    """``channel`` if it is a valid channel name, else :class:`BadRequest` saying why."""
    if not isinstance(channel, str) or not channel:
        raise BadRequest("channel must be a non-empty string")
    if len(channel) > max_length:
        raise BadRequest("channel name too long")
    if _CHANNEL.fullmatch(channel) is None:
        raise BadRequest("channel name has invalid characters")
    return channel


def user_problem(user: Any) -> str | None:
    """What is wrong with a user id, or None: the one rule of every surface that takes one."""
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_LENGTH:
        return f"user must be a string of 1 to {MAX_USER_LENGTH} characters"
    return None


def check_user(user: Any) -> str:
    """``user`` if it is a valid user id, else :class:`BadRequest` saying why."""
    problem = user_problem(user)
    if problem is not None:
        raise BadRequest(problem)
    return user


def info_problem(info: Any) -> str | None:
    """What is wrong with an ``info`` (a token's claim, a connect or subscribe proxy's answer),
    or None: it must cross Redis (msgpack) and fit ``MAX_INFO_BYTES``."""
    try:
        size = len(msgpack.packb(info, use_bin_type=True))
    except (OverflowError, TypeError, ValueError):
        return "info cannot be encoded"
    if size > MAX_INFO_BYTES:
        return f"info is over {MAX_INFO_BYTES} bytes"
    return None


def disconnect_problem(user: Any, code: Any, reason: Any) -> str | None:
    """What is wrong with a disconnect's fields, or None: the one rule for the HTTP API (400),
    the publishers (``ValueError``) and the hub reading a control message (dropped)."""
    return user_problem(user) or close_problem(code, reason)


def close_problem(code: Any, reason: Any) -> str | None:
    """What is wrong with an application close's code and reason, or None: a disconnect's
    fields, and a proxy backend's ``disconnect`` answer."""
    if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
        return "code must be an integer from 4000 to 4999"
    problem = f"reason must be a string of at most {MAX_REASON_BYTES} bytes"
    if not isinstance(reason, str):
        return problem
    try:
        size = len(reason.encode())
    except UnicodeEncodeError:  # an unpaired surrogate: no close frame can carry it
        return problem
    return problem if size > MAX_REASON_BYTES else None


def parse_since(command: dict[str, Any]) -> tuple[int, str] | None:
    """The ``since`` position of a command: ``{"offset": <int >= 0>, "epoch": <str>}``."""
    since = command.get("since")
    if since is None:
        return None
    if type(since) is not dict:
        raise BadRequest("since must be an object with offset and epoch")
    offset, epoch = since.get("offset"), since.get("epoch")
    if type(offset) is not int or offset < 0:
        raise BadRequest("since.offset must be a non-negative integer")
    if type(epoch) is not str or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        raise BadRequest(f"since.epoch must be a string of 1 to {MAX_EPOCH_LENGTH} characters")
    return offset, epoch


def parse_history(command: dict[str, Any]) -> tuple[tuple[int, str] | None, int | None]:
    """The ``since`` and ``limit`` of a history request (the command, or the HTTP body)."""
    since = parse_since(command)
    limit = command.get("limit")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise BadRequest("limit must be a non-negative integer")
    return since, limit


def history_limit(limit: int | None, ns: Namespace) -> int:
    """How many publications a history request lists: what it asked for, at most the
    namespace's ``history_size`` (all it keeps when it asked for no limit)."""
    return ns.history_size if limit is None else min(limit, ns.history_size)


def history_result(page: HistoryPage, since: tuple[int, str] | None) -> dict[str, Any]:
    """The answer to a history request (command or HTTP). With a ``since`` of another epoch
    nothing is listed: those offsets name other publications."""
    entries = page.entries
    if since is not None and since[1] != page.epoch:
        entries = []
    publications = [{k: v for k, v in e.items() if k != "epoch"} for e in entries]
    return {"publications": publications, "offset": page.offset, "epoch": page.epoch}
