"""docs/openapi.yaml against the running server: the document is valid OpenAPI 3.1, every route
the server answers is in it, and every documented (path, method, status) is provoked with a real
request to real ``hub serve`` processes (a private Redis, killed at the end for the 503s), the
answer checked for its status, media type, documented headers and body schema. A status the
spec adds without a way to provoke it here, or one the server stops giving, fails the test.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import msgpack
import yaml
from hubfix import API_KEY, SECRET
from hubproc import HubProcess
from openapi_spec_validator import validate

from hub.inbox import RedisInbox
from hub.redis.cluster import Router
from hub.redis.publisher import Publisher

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
KEY = {"X-API-Key": API_KEY}
JSON = {"Content-Type": "application/json"}
NAMESPACES = """
[namespaces.chat]
publish = true
history_size = 10
history_ttl = 600
presence = true
"""
PROD = f'token_secret = "{SECRET}"\napi_key = "{API_KEY}"\n' + NAMESPACES
NO_KEY = f'token_secret = "{SECRET}"\n' + NAMESPACES

#: A valid body for each POST route (checked against the spec's request schema too).
VALID = {
    "/api/publish": {"channel": "chat:spec", "data": {"text": "hi"}},
    "/api/broadcast": {"data": "all"},
    "/api/send": {"user": "alice", "data": "dm"},
    "/api/disconnect": {"user": "nobody", "code": 4003, "reason": "spec"},
    "/api/history": {"channel": "chat:spec", "limit": 5},
    "/api/presence": {"channel": "chat:spec"},
    "/api/presence_stats": {"channel": "chat:spec"},
    "/api/notify": {"user": "alice", "data": {"unread": 3}, "id": "spec-1", "ttl": 60},
    "/api/inbox": {"user": "alice", "limit": 10},
}


def documented() -> set[tuple[str, str, int]]:
    return {
        (path, method.upper(), int(status))
        for path, item in SPEC["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
    }


def resolve(obj: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in obj:
        node: Any = SPEC
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def check_schema(schema: dict[str, Any], value: Any) -> None:
    """Validate with the spec's components in reach of its ``$ref``s (JSON Schema 2020-12)."""
    jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]}).validate(value)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def request(
    hub: HubProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return Answer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


@dataclass
class Servers:
    prod: HubProcess
    no_key: HubProcess
    dev: HubProcess
    redis: RedisServer
    etag: list[str] = field(default_factory=list)


def post(hub: HubProcess, path: str, body: Any, headers: dict[str, str] | None = None) -> Answer:
    return request(hub, "POST", path, json.dumps(body).encode(), {**JSON, **(headers or {})})


def scenarios() -> dict[tuple[str, str, int], Callable[[Servers], Answer]]:
    """How to provoke each documented answer; the 503s run last, once Redis is gone."""
    table: dict[tuple[str, str, int], Callable[[Servers], Answer]] = {}
    for path, body in VALID.items():
        key = {"Authorization": f"apikey {API_KEY}"} if path.endswith("_stats") else KEY
        table[(path, "POST", 200)] = lambda s, p=path, b=body, k=key: post(s.prod, p, b, k)
        table[(path, "POST", 400)] = lambda s, p=path: post(s.prod, p, {}, KEY)
        table[(path, "POST", 401)] = lambda s, p=path, b=body: post(
            s.prod, p, b, {"X-API-Key": "wrong"}
        )
        table[(path, "POST", 403)] = lambda s, p=path, b=body: post(s.no_key, p, b, KEY)
        table[(path, "POST", 405)] = lambda s, p=path: request(s.prod, "GET", p, None, KEY)
        table[(path, "POST", 413)] = lambda s, p=path: request(
            s.prod, "POST", p, b"{}", {**JSON, **KEY, "Content-Length": str(2 << 20)}
        )
        table[(path, "POST", 415)] = lambda s, p=path, b=body: request(
            s.prod, "POST", p, json.dumps(b).encode(), {"Content-Type": "text/plain", **KEY}
        )
        table[(path, "POST", 503)] = lambda s, p=path, b=body: post(s.prod, p, b, KEY)
    table[("/api/history", "POST", 422)] = history_json_cannot_carry
    table[("/api/inbox", "POST", 422)] = inbox_json_cannot_carry
    # /api/inbox also answers GET (fields in the query): PUT is what it refuses.
    table[("/api/inbox", "POST", 405)] = lambda s: request(s.prod, "PUT", "/api/inbox", b"{}", KEY)
    get = "/api/inbox?user=alice&limit=10"
    table[("/api/inbox", "GET", 200)] = lambda s: request(s.prod, "GET", get, None, KEY)
    table[("/api/inbox", "GET", 400)] = lambda s: request(
        s.prod, "GET", "/api/inbox?user=a&user=b", None, KEY
    )
    table[("/api/inbox", "GET", 401)] = lambda s: request(s.prod, "GET", get)
    table[("/api/inbox", "GET", 403)] = lambda s: request(s.no_key, "GET", get, None, KEY)
    table[("/api/inbox", "GET", 422)] = lambda s: (
        inbox_json_cannot_carry(s),
        request(s.prod, "GET", "/api/inbox?user=bytes", None, KEY),
    )[1]
    table[("/api/inbox", "GET", 503)] = lambda s: request(s.prod, "GET", get, None, KEY)
    table[("/api/stats", "GET", 200)] = lambda s: request(s.prod, "GET", "/api/stats", None, KEY)
    table[("/api/stats", "GET", 401)] = lambda s: request(s.prod, "GET", "/api/stats")
    table[("/api/stats", "GET", 405)] = lambda s: request(s.prod, "POST", "/api/stats", b"", KEY)
    table[("/healthz", "GET", 200)] = lambda s: request(s.prod, "GET", "/healthz")
    table[("/readyz", "GET", 200)] = lambda s: request(s.prod, "GET", "/readyz")
    table[("/readyz", "GET", 503)] = lambda s: request(s.prod, "GET", "/readyz")
    table[("/metrics", "GET", 200)] = lambda s: request(s.prod, "GET", "/metrics")
    table[("/hub.js", "GET", 200)] = hub_js
    table[("/hub.js", "GET", 304)] = lambda s: request(
        s.prod, "GET", "/hub.js", None, {"If-None-Match": s.etag[0]}
    )
    table[("/", "GET", 200)] = lambda s: request(s.dev, "GET", "/")
    table[("/", "GET", 404)] = lambda s: request(s.prod, "GET", "/")
    return table


def hub_js(servers: Servers) -> Answer:
    answer = request(servers.prod, "GET", "/hub.js")
    servers.etag.append(answer.headers.get("etag", ""))
    return answer


def history_json_cannot_carry(servers: Servers) -> Answer:
    with Publisher(servers.redis.url, prefix="hub") as publisher:
        publisher.publish("chat:bytes", b"\x00\x01", history_size=10, history_ttl=600)
    return post(servers.prod, "/api/history", {"channel": "chat:bytes"}, KEY)


def inbox_json_cannot_carry(servers: Servers) -> Answer:
    async def notify() -> None:
        inbox = RedisInbox(Router.from_url(servers.redis.url))
        await inbox.notify("bytes", msgpack.packb({"data": b"\x00"}, use_bin_type=True))
        await inbox.close()

    asyncio.run(notify())
    return post(servers.prod, "/api/inbox", {"user": "bytes"}, KEY)


def test_the_spec_is_valid_openapi_3_1() -> None:
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_every_route_the_server_answers_is_documented() -> None:
    """Paths named in hub/http_api.py (the WebSocket endpoint and the admin page's own API
    aside) are all in the spec, and the spec names no other."""
    source = (ROOT / "hub" / "http_api.py").read_text()
    routes = set(re.findall(r'path == "(/[^"]*)"', source))
    routes |= set(re.findall(r'"(/api/\w+)": self\._', source))
    routes = {r for r in routes if r != "/ws" and not r.startswith("/admin")}
    assert len(routes) >= 12, routes
    assert routes == set(SPEC["paths"]), routes ^ set(SPEC["paths"])


def test_every_documented_answer_is_what_the_server_gives(
    hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    table = scenarios()
    assert set(table) == documented(), set(table) ^ documented()
    servers = Servers(
        prod=hubs(PROD, redis_server.url), no_key=hubs(NO_KEY), dev=hubs(""), redis=redis_server
    )
    problems: list[str] = []
    order = sorted(table, key=lambda k: (k[2] == 503, k[0] == "/hub.js" and k[2] == 304))
    for scenario in order:
        path, method, status = scenario
        if status == 503 and redis_server.process is not None:
            redis_server.kill()  # from here on the broker and the presence store are gone
        answer = table[scenario](servers)
        deadline = time.monotonic() + 10
        while status == 503 and answer.status != 503 and time.monotonic() < deadline:
            time.sleep(0.1)  # the hub notices the lost link within moments
            answer = table[scenario](servers)
        problems += check(scenario, answer)
        if status == 200 and method == "POST":
            operation = SPEC["paths"][path]["post"]
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            try:
                check_schema(schema, VALID[path])
            except jsonschema.ValidationError as exc:
                problems.append(f"{method} {path}: the spec refuses a valid body: {exc.message}")
    assert not problems, "\n".join(problems)


def check(scenario: tuple[str, str, int], answer: Answer) -> list[str]:
    """What differs between an answer and the spec's description of it."""
    path, method, status = scenario
    where = f"{method} {path} -> {status}"
    if answer.status != status:
        return [f"{where}: got {answer.status} {answer.body[:200]!r}"]
    described = resolve(SPEC["paths"][path][method.lower()]["responses"][str(status)])
    problems = []
    for name, header in described.get("headers", {}).items():
        value = answer.headers.get(name.lower())
        if value is None:
            problems.append(f"{where}: no {name} header")
        elif "const" in header["schema"] and value != header["schema"]["const"]:
            problems.append(f"{where}: {name} is {value!r}")
    content = described.get("content")
    if content is None:
        if answer.body:
            problems.append(f"{where}: a body where none is described")
        return problems
    media = answer.headers.get("content-type", "").split(";")[0].strip()
    if media not in content:
        return [*problems, f"{where}: content type {media!r}, described {sorted(content)}"]
    schema = content[media]["schema"]
    try:
        value: Any = (
            json.loads(answer.body) if media == "application/json" else answer.body.decode()
        )
        check_schema(schema, value)
    except (ValueError, jsonschema.ValidationError) as exc:
        reason = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
        at = exc.json_path if isinstance(exc, jsonschema.ValidationError) else "$"
        problems.append(f"{where}: body {answer.body[:200]!r} does not match at {at}: {reason}")
    return problems
