"""Authorization holes, tried as an attacker would against real ``hub serve`` processes: each
test is one behaviour, and each hub's log must end without a traceback (procfix.hub_serve).

Publishing obeys the read rules (and ``publish = "token"``), client publications carry the
sender the server knows, dev mode is an explicit choice, tokens can be held to ``exp`` /
lifetime / ``iss`` / ``aud``, short secrets are refused, failed authentication is closed at once
and rate-limited per source address, and cross-site use is refused.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from hubfix import (
    ANY_CLIENT,
    API_KEY,
    SECRET,
    RawClient,
    api,
    client,
    http,
    metric,
    scrape,
)
from procfix import HUB, ServedHub, clean_env, hub_serve
from websockets.exceptions import InvalidStatus
from wshelp import run

from hub.tokens import mint_token

SECURE = f"""
token_secret = "{SECRET}"
api_key = "{API_KEY}"
"""

NAMESPACES = """
[namespaces.locked]
subscribe = "token"
publish = true

[namespaces.dm]
personal = true
publish = true

[namespaces.chat]
publish = true

[namespaces.team]
publish = "token"
"""


@pytest.fixture(scope="module")
def secure_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedHub]:
    """One hub with tokens and the namespaces above for the tests that fail no authentication
    (each starting its own would cost seconds); its log is checked when the module is done."""
    with hub_serve(tmp_path_factory.mktemp("secure"), SECURE + NAMESPACES) as hub:
        yield hub


def token(user: str, **kwargs: Any) -> str:
    return mint_token(user, SECRET, **kwargs)


async def nothing_but_the_marker(hub: ServedHub, subscriber: Any, channel: str) -> None:
    """What a subscriber gets next is a marker published by the backend: nothing refused
    reached it before."""
    status, _ = await api(hub, "/api/publish", {"channel": channel, "data": "marker"})
    assert status == 200
    assert await subscriber.push() == {"channel": channel, "data": "marker"}


# --- publishing obeys the read rules -------------------------------------------------------------


def test_publish_where_the_token_does_not_grant_subscribe_is_refused(secure_hub: ServedHub) -> None:
    async def main(hub: ServedHub) -> None:
        alice = token("alice", channels=["locked:a"])
        bob = token("bob", channels=["locked:b"])
        async with client(hub, token=alice) as a, client(hub, token=bob) as b:
            await b.ok("subscribe", channel="locked:b")
            assert await a.error("subscribe", channel="locked:b") == 103
            assert await a.error("publish", channel="locked:b", data="sneaky") == 103
            await nothing_but_the_marker(hub, b, "locked:b")
            await a.ok("publish", channel="locked:a", data="mine")

    run(lambda: main(secure_hub))


def test_publish_to_another_users_personal_channel_is_refused(secure_hub: ServedHub) -> None:
    async def main(hub: ServedHub) -> None:
        async with client(hub, token=token("alice")) as a, client(hub, token=token("bob")) as b:
            await b.ok("subscribe", channel="dm:bob")
            assert await a.error("publish", channel="dm:bob", data="impostor") == 103
            await nothing_but_the_marker(hub, b, "dm:bob")
            await b.ok("publish", channel="dm:bob", data="note to self")
            push = await b.push()
            assert (push["data"], push["from"]["user"]) == ("note to self", "bob")

    run(lambda: main(secure_hub))


def test_publish_token_namespace_needs_the_publish_claim(secure_hub: ServedHub) -> None:
    async def main(hub: ServedHub) -> None:
        writer = token("alice", publish=["team:red", "team:blue-*"])
        async with (
            client(hub, token=writer) as a,
            client(hub, token=token("carol", channels=["team:*"])) as c,
        ):
            await c.ok("subscribe", channel="team:red")
            await a.ok("publish", channel="team:red", data="go")
            assert (await c.push())["data"] == "go"
            await a.ok("publish", channel="team:blue-2", data="ok")
            assert await a.error("publish", channel="team:green", data="no") == 103
            # Reading may be open to all; writing is still only what the claim grants.
            assert await c.error("publish", channel="team:red", data="no") == 103
            await nothing_but_the_marker(hub, c, "team:red")

    run(lambda: main(secure_hub))


# --- who wrote it --------------------------------------------------------------------------------


def test_client_publication_carries_the_sender_the_server_knows(secure_hub: ServedHub) -> None:
    """``from`` is the token's user and info and the connection's id, in both encodings; a
    ``from`` the client puts in its command changes nothing."""

    async def main(hub: ServedHub) -> None:
        alice = token("alice", info={"name": "Alice"})
        async with (
            client(hub, token=alice) as a,
            client(hub, "hub.v1.msgpack", token=token("bob")) as b,
        ):
            await b.ok("subscribe", channel="chat:room")
            await a.ok("subscribe", channel="chat:room")
            forged = {"user": "bob", "client": "x" * 32, "info": "admin"}
            await a.ok("publish", channel="chat:room", data="hi", **{"from": forged})
            expected = {
                "channel": "chat:room",
                "data": "hi",
                "from": {"user": "alice", "client": ANY_CLIENT, "info": {"name": "Alice"}},
            }
            mine, theirs = await a.push(), await b.push()
            assert mine == theirs == expected
            # The same connection always shows the same client id.
            await a.ok("publish", channel="chat:room", data="again")
            assert (await b.push())["from"] == mine["from"]

    run(lambda: main(secure_hub))


def test_backend_publication_has_no_sender_unless_it_sets_one(secure_hub: ServedHub) -> None:
    async def main(hub: ServedHub) -> None:
        async with client(hub, token=token("bob")) as b:
            await b.ok("subscribe", channel="chat:room")
            assert (await api(hub, "/api/publish", {"channel": "chat:room", "data": 1}))[0] == 200
            assert await b.push() == {"channel": "chat:room", "data": 1}
            sender = {"user": "support", "info": {"role": "staff"}}
            body = {"channel": "chat:room", "data": 2, "from": sender}
            assert (await api(hub, "/api/publish", body))[0] == 200
            assert await b.push() == {"channel": "chat:room", "data": 2, "from": sender}
            for bad in ("support", {"user": ""}, {"user": "x", "admin": True}, {"user": 5}):
                body = {"channel": "chat:room", "data": 3, "from": bad}
                status, answer = await api(hub, "/api/publish", body)
                assert status == 400 and "from" in answer["error"]["message"], answer
            await nothing_but_the_marker(hub, b, "chat:room")

    run(lambda: main(secure_hub))


# --- dev mode is a choice ------------------------------------------------------------------------


def serve_once(
    tmp_path: Path, toml: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``hub serve`` that must stop at once (a config error): its exit code and output."""
    config = tmp_path / "refused.toml"
    config.write_text(toml)
    return subprocess.run(
        [HUB, "serve", "--config", str(config), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**env),
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_serve_without_credentials_stops_with_one_line_saying_what_to_set(tmp_path: Path) -> None:
    one_line_error(serve_once(tmp_path, ""), "HUB_TOKEN_SECRET", "--insecure")
    # Each explicit way into dev mode works: the flag, the setting, the environment variable.
    for toml, args, env in (
        ("", ("--insecure",), {}),
        ("insecure = true\n", (), {}),
        ("", (), {"HUB_INSECURE": "1"}),
    ):
        with hub_serve(tmp_path, toml, *args, env=env) as hub:
            assert "insecure dev mode" in hub.log()

            async def anonymous(hub: ServedHub = hub) -> None:
                async with client(hub, user="alice") as a:
                    await a.ok("subscribe", channel="news")

            run(anonymous)


@pytest.mark.parametrize(
    ("toml", "env", "field"),
    [
        ('token_secret = "0123456789abcdef0123456789abcde"\n', {}, "token_secret"),
        ("", {"HUB_TOKEN_SECRET": "short"}, "token_secret"),
        (f'token_secret = "{SECRET}"\napi_key = "guessable"\n', {}, "api_key"),
    ],
    ids=["secret-31-bytes", "secret-from-env", "api-key"],
)
def test_short_secrets_are_refused_outside_dev_mode(
    tmp_path: Path, toml: str, env: dict[str, str], field: str
) -> None:
    one_line_error(serve_once(tmp_path, toml, **env), field, "32 bytes")


def test_a_short_api_key_is_fine_in_dev_mode(tmp_path: Path) -> None:
    async def main(hub: ServedHub) -> None:
        assert (await api(hub, "/api/broadcast", {"data": 1}, key="dev"))[0] == 200
        assert (await api(hub, "/api/broadcast", {"data": 1}, key="other"))[0] == 401

    with hub_serve(tmp_path, 'api_key = "dev"\n', "--insecure") as hub:
        run(lambda: main(hub))


# --- tokens --------------------------------------------------------------------------------------


async def refused(hub: ServedHub, credential: str) -> tuple[int | None, str | None]:
    """The close code and reason a connection with ``credential`` gets."""
    async with client(hub, token=credential) as c:
        return await c.closed_with()


def test_token_exp_lifetime_issuer_and_audience_are_enforced(tmp_path: Path) -> None:
    toml = (
        SECURE
        + """
token_max_lifetime = 600
token_issuer = "https://auth.example"
token_audience = "hub"
"""
    )
    good = {"iss": "https://auth.example", "aud": "hub"}

    async def main(hub: ServedHub) -> None:
        async with client(hub, token=token("alice", ttl=300, **good)) as a:
            await a.ok("subscribe", channel="news")
        for bad, why in (
            (token("alice", ttl=None, **good), "exp"),
            (token("alice", ttl=3600, **good), "longer than 600"),
            (token("alice", ttl=300, iss="https://evil.example", aud="hub"), "issuer"),
            (token("alice", ttl=300, iss="https://auth.example", aud="other"), "audience"),
            (token("alice", ttl=300, iss="https://auth.example"), "aud"),
        ):
            code, reason = await refused(hub, bad)
            assert code == 4500 and why in (reason or "").lower(), (why, code, reason)

    with hub_serve(tmp_path, toml) as hub:
        run(lambda: main(hub))


def test_a_token_whose_exp_overflows_is_an_auth_failure_not_a_traceback(tmp_path: Path) -> None:
    async def main(hub: ServedHub) -> None:
        for exp in (10**400, 10**20, 1e308):
            crafted = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
            code, reason = await refused(hub, crafted)
            assert code == 4500, (exp, code, reason)
        samples = await scrape(hub)
        assert metric(samples, "hub_handshake_failures_total", reason="unauthorized") == 3
        assert metric(samples, "hub_command_failures_total") == 0

    with hub_serve(tmp_path, SECURE) as hub:
        run(lambda: main(hub))


# --- failed authentication is cheap and bounded --------------------------------------------------


def test_failed_authentication_is_closed_at_once_with_4500(tmp_path: Path) -> None:
    """The hub sends close 4500 and ends the TCP connection without waiting for the client's
    closing handshake (this client never sends one)."""

    async def main(hub: ServedHub) -> None:
        loop = asyncio.get_running_loop()
        raw = await RawClient.open(hub, "/ws?token=not-a-token")
        try:
            started = loop.time()
            frames = await raw.frames_until_close()
            code = int.from_bytes(frames[-1][1][:2], "big")
            assert code == 4500, frames
            assert await raw.frame(timeout=2) is None, "EOF right after the close frame"
            assert loop.time() - started < 2
        finally:
            raw.close()

    with hub_serve(tmp_path, SECURE) as hub:
        run(lambda: main(hub))


def test_an_address_that_keeps_failing_is_answered_429_for_a_while(tmp_path: Path) -> None:
    """After ``auth_failures`` failures an address gets 429 at the handshake, before any token
    is looked at, good ones too; other addresses (here behind the local proxy, by
    X-Forwarded-For) are not affected."""
    toml = SECURE + "auth_failures = 3\nauth_failure_window = 60\n"

    async def main(hub: ServedHub) -> None:
        attacker = {"X-Forwarded-For": "198.51.100.7"}
        for _ in range(3):
            async with client(hub, headers=attacker, token="guess") as c:
                assert (await c.closed_with())[0] == 4500
        for credential in ("guess", token("alice")):
            with pytest.raises(InvalidStatus) as caught:
                async with client(hub, headers=attacker, token=credential):
                    pass
            assert caught.value.response.status_code == 429
            assert caught.value.response.headers.get("Retry-After", "").isdigit()
        # Someone else behind the same proxy, and a client of its own address, still get in.
        others = ({"X-Forwarded-For": "198.51.100.8"}, None)
        for headers in others:
            async with client(hub, headers=headers, token=token("bob")) as b:
                await b.ok("subscribe", channel="news")
        # A client cannot hide behind a forged header the proxy appends to.
        spoofed = {"X-Forwarded-For": "203.0.113.1, 198.51.100.7"}
        with pytest.raises(InvalidStatus):
            async with client(hub, headers=spoofed, token=token("alice")):
                pass
        samples = await scrape(hub)
        assert metric(samples, "hub_rate_limited_total", limit="auth") == 3

    with hub_serve(tmp_path, toml) as hub:
        run(lambda: main(hub))


async def handshake_status(hub: ServedHub, **headers: str) -> int:
    """The status of a WebSocket upgrade of /ws sent with exactly these extra headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        lines = [
            "GET /ws?user=x HTTP/1.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = await asyncio.wait_for(reader.readline(), 5)
        return int(status_line.split()[1])
    finally:
        writer.close()


# --- cross-site use ----------------------------------------------------------------------------


def test_dev_mode_lets_only_the_hubs_own_page_open_a_websocket(tmp_path: Path) -> None:
    async def main(hub: ServedHub) -> None:
        own = f"http://127.0.0.1:{hub.port}"
        async with client(hub, origin=own, user="alice") as a:
            await a.ok("subscribe", channel="news")
        async with client(hub, user="bob") as b:  # no Origin: not a browser
            await b.ok("subscribe", channel="news")
        # Another site, and a DNS-rebinding name that points at the hub: refused.
        for origin, host in (
            ("https://evil.example", f"127.0.0.1:{hub.port}"),
            (f"http://127.0.0.1:{hub.port + 1}", f"127.0.0.1:{hub.port}"),
            (f"http://evil.example:{hub.port}", f"evil.example:{hub.port}"),
        ):
            assert await handshake_status(hub, Origin=origin, Host=host) == 403, origin
        assert await handshake_status(hub, Origin=own, Host=f"127.0.0.1:{hub.port}") == 101
        lo = f"localhost:{hub.port}"
        assert await handshake_status(hub, Origin=f"http://{lo}", Host=lo) == 101
        samples = await scrape(hub)
        assert metric(samples, "hub_handshake_failures_total", reason="origin") == 3

    with hub_serve(tmp_path, "", "--insecure") as hub:
        run(lambda: main(hub))


def test_http_api_accepts_only_application_json(tmp_path: Path) -> None:
    """A page on another site can POST a form or text/plain without a CORS preflight; not JSON."""

    async def main(hub: ServedHub) -> None:
        body = json.dumps({"data": 1}).encode()
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/octet-stream",  # what aiohttp sends for bytes without one
            "application/jsonp",
            "text/json",
        ):
            headers = {"X-API-Key": API_KEY, "Content-Type": content_type}
            status, _, answer = await http(
                hub, "POST", "/api/broadcast", data=body, headers=headers
            )
            assert status == 415, (content_type, answer)
        headers = {"X-API-Key": API_KEY, "Content-Type": "Application/JSON; charset=utf-8"}
        status, _, answer = await http(hub, "POST", "/api/broadcast", data=body, headers=headers)
        assert status == 200, answer

    with hub_serve(tmp_path, SECURE) as hub:
        run(lambda: main(hub))
