"""The proxies' transport: ``POST <url>`` with a JSON body to the application's backend, whose
JSON answer decides (docs/proxy.md has the contract).

One pooled aiohttp session serves every proxy. Each call is bounded in time (``proxy_timeout``,
waiting for a free slot included) and in number (``proxy_concurrency`` calls in flight per
proxy): a slow or dead backend costs a client a clear error (113, :class:`ProxyFailed`), never a
hang, and never an accepted request. With ``proxy_secret`` every call is signed, so the backend
can refuse whatever does not come from the hub.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import orjson

from .config import Settings
from .errors import ErrorCode, ProxyDisconnect, ProxyFailed, ProxyRefused
from .metrics import Metrics
from .rules import close_problem

__all__ = ["MAX_ANSWER", "PROXIES", "ProxyClient", "sign"]

#: The proxies, each the label of its metrics.
PROXIES = ("connect", "subscribe", "publish", "rpc")
#: Bytes of a backend's answer read at most: beyond it the answer is malformed.
MAX_ANSWER = 1 << 20
#: The error codes a backend may answer with: the hub's own (100-199, e.g. 103) and the
#: application's (400-1999).
BACKEND_CODES = range(100, 2000)
SIGNATURE_HEADER = "X-Hub-Signature"
TIMESTAMP_HEADER = "X-Hub-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>``
    keyed with ``proxy_secret`` (the timestamp lets a backend refuse replayed calls)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class ProxyClient:
    """The hub's calls to its backend. Made once per hub; :meth:`close` releases the pool."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.timeout = settings.proxy_timeout
        self.secret = settings.proxy_secret
        self.metrics = metrics
        self._limit = settings.proxy_concurrency
        self._slots = {kind: asyncio.Semaphore(self._limit) for kind in PROXIES}
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit * len(PROXIES))
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                auto_decompress=False,  # a compressed answer could be a bomb; backends need none
            )
        return session

    def count_error(self, kind: str, reason: str) -> None:
        self.metrics.proxy_errors.labels(kind, reason).inc()

    def malformed(self, kind: str, message: str) -> ProxyFailed:
        """An answer of the contract's shape whose content the hub refuses (a field of the
        wrong type or over its limit): counted, to raise; nothing is done (never a yes)."""
        self.count_error(kind, "malformed")
        return ProxyFailed(message, "malformed")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, kind: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``url``; the answer's ``result`` object. Raises :class:`ProxyRefused`
        (the backend's error), :class:`ProxyDisconnect` or :class:`ProxyFailed`."""
        metrics = self.metrics
        metrics.proxy_calls.labels(kind).inc()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots[kind]:
                    raw = await self._post(url, orjson.dumps(body))
            return _answer(raw)
        except ProxyFailed as exc:
            metrics.proxy_errors.labels(kind, exc.reason).inc()
            raise
        except TimeoutError:
            metrics.proxy_errors.labels(kind, "timeout").inc()
            raise ProxyFailed(f"backend timeout ({kind} proxy)", "timeout") from None
        except (aiohttp.ClientError, OSError):
            metrics.proxy_errors.labels(kind, "unavailable").inc()
            raise ProxyFailed(f"backend unavailable ({kind} proxy)", "unavailable") from None
        finally:
            metrics.proxy_seconds.labels(kind).observe(time.perf_counter() - started)

    async def _post(self, url: str, payload: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, payload)
        async with self._pool().post(
            url, data=payload, headers=headers, allow_redirects=False
        ) as response:
            if response.status != 200:
                raise ProxyFailed(f"backend answered {response.status}", "status")
            if (response.content_length or 0) > MAX_ANSWER:
                raise ProxyFailed("backend answer too large", "malformed")
            chunks, size = [], 0
            async for chunk in response.content.iter_chunked(1 << 16):  # to the end, bounded
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise ProxyFailed("backend answer too large", "malformed")
                chunks.append(chunk)
            return b"".join(chunks)


def _answer(raw: bytes) -> dict[str, Any]:
    """The ``result`` of a backend's answer, or the exception its ``error`` / ``disconnect``
    asks for; anything else is malformed (refused, never taken as a yes)."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProxyFailed("backend answer is not json", "malformed") from None
    if type(answer) is not dict or len(answer.keys() & {"result", "error", "disconnect"}) != 1:
        raise ProxyFailed("backend answer needs one of result, error, disconnect", "malformed")
    if "result" in answer:
        result = answer["result"]
        if type(result) is not dict:
            raise ProxyFailed("backend result must be an object", "malformed")
        return result
    if "error" in answer:
        error = answer["error"]
        code = error.get("code") if type(error) is dict else None
        message = error.get("message", "") if type(error) is dict else None
        if type(code) is not int or code not in BACKEND_CODES or type(message) is not str:
            raise ProxyFailed("backend error needs an integer code and a message", "malformed")
        raise ProxyRefused(message[:200], _code(code))
    disconnect = answer["disconnect"]
    if type(disconnect) is not dict:
        raise ProxyFailed("backend disconnect must be an object", "malformed")
    code, reason = disconnect.get("code"), disconnect.get("reason", "")
    problem = close_problem(code, reason)  # the rule every disconnect obeys
    if problem is not None:
        raise ProxyFailed(f"backend disconnect: {problem}", "malformed")
    raise ProxyDisconnect(code, reason)


def _code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code
