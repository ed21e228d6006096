"""A real application backend for the proxy tests: a standard-library HTTP server on its own
thread, answering the hub's connect / subscribe / publish / RPC calls (docs/proxy.md) like a
small chat app would, checking every call's signature, and able to misbehave on purpose (slow,
garbage, 500). It counts the calls it gets and the most it ever had in flight at once, by path."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Backend", "backend"]

Answer = tuple[int, bytes]  # status, body
HUGE = b'{"result": {"data": "' + b"x" * (2 << 20) + b'"}}'  # over the hub's 1 MiB


def ok(result: dict[str, Any]) -> Answer:
    return 200, json.dumps({"result": result}).encode()


def error(code: int, message: str) -> Answer:
    return 200, json.dumps({"error": {"code": code, "message": message}}).encode()


class Backend:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.bad_signatures = 0
        self.in_flight: dict[str, int] = {}  # by path
        self.most_in_flight: dict[str, int] = {}
        self.expire_in: float | None = None  # the connect answer's expire_at, from now
        self.connect_fault: Answer | None = None  # what every connect call gets, if set
        self.lock = threading.Lock()
        self.routes: dict[str, Callable[[dict[str, Any]], Answer]] = {
            "/connect": self.connect,
            "/subscribe": self.subscribe,
            "/publish": self.publish,
            "/rpc": self.rpc,
            "/slow": self.slow,
            "/garbage": lambda body: (200, b"{not json"),
            "/status500": lambda body: (500, b'{"result": {}}'),
            "/empty": lambda body: (200, b"{}"),
            # A disconnect reason past the rule (120 bytes; a close frame carries 123).
            "/long-reason": lambda body: (
                200,
                b'{"disconnect": {"code": 4003, "reason": "' + b"x" * 124 + b'"}}',
            ),
            "/huge": lambda body: (200, HUGE),
            "/huge-stream": lambda body: (200, HUGE),  # no Content-Length: ends at the close
        }
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                backend.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def calls_to(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for p, body in self.calls if p == path]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length", "0"))
        raw = request.rfile.read(length)
        timestamp = request.headers.get("X-Hub-Timestamp", "")
        mac = hmac.new(self.secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
        signed = hmac.compare_digest(
            request.headers.get("X-Hub-Signature", ""), "sha256=" + mac.hexdigest()
        )
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 60
        path = request.path
        with self.lock:
            now = self.in_flight[path] = self.in_flight.get(path, 0) + 1
            self.most_in_flight[path] = max(self.most_in_flight.get(path, 0), now)
        try:
            if not (signed and fresh):
                with self.lock:
                    self.bad_signatures += 1
                status, body = 403, b'{"error": "bad signature"}'
            else:
                payload = json.loads(raw)
                with self.lock:
                    self.calls.append((request.path, payload))
                status, body = self.routes[request.path](payload)
        finally:
            with self.lock:
                self.in_flight[path] -= 1
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        if not path.endswith("-stream"):
            request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    # -- a small chat app ------------------------------------------------------------------------

    SESSIONS = {"s-alice": "alice", "s-bob": "bob"}

    def connect(self, body: dict[str, Any]) -> Answer:
        if self.connect_fault is not None:
            return self.connect_fault
        sid = body["cookies"].get("sid")
        if sid == "banned":
            return 200, b'{"disconnect": {"code": 4507, "reason": "banned"}}'
        # A backend failing at connect, each way it can (the session cookie picks it).
        if sid == "slow":
            time.sleep(3)
            return ok({"user": "slowpoke"})
        if sid == "garbage":
            return 200, b"{not json"
        if sid == "status500":
            return 500, b'{"result": {"user": "alice"}}'
        if sid == "longuser":
            return ok({"user": "x" * 201})
        if sid == "biginfo":
            return ok({"user": "alice", "info": {"bio": "x" * 5000}})
        user = self.SESSIONS.get(sid or "")
        if user is None:
            return error(401, "no such session")
        result: dict[str, Any] = {"user": user, "info": {"ua": body["headers"].get("User-Agent")}}
        if body["headers"].get("X-Rooms"):
            result["channels"] = body["headers"]["X-Rooms"].split(",")
        if self.expire_in is not None:
            result["expire_at"] = int(time.time() + self.expire_in)
        return ok(result)

    def subscribe(self, body: dict[str, Any]) -> Answer:
        channel = body["channel"]
        if channel.endswith(":secret") and body["user"] != "alice":
            return error(403, "not a member")
        if channel.endswith(":kick"):
            return 200, b'{"disconnect": {"code": 4003, "reason": "kicked"}}'
        if channel.endswith(":roles"):  # the subscriber's role in this room, for everyone to see
            role = "host" if body["user"] == "alice" else "guest"
            return ok({"info": {"role": role}, "data": {"welcome": body["user"]}})
        if channel.endswith(":biginfo"):
            return ok({"info": {"bio": "x" * 5000}})
        if channel.endswith(":bigdata"):
            return ok({"data": "x" * 70000})  # over the namespace's max_message_size
        if channel.endswith(":wrongtype"):
            return 200, b'{"result": ["yes"]}'
        return ok({"data": {"welcome": body["user"]}})

    def publish(self, body: dict[str, Any]) -> Answer:
        data = body["data"]
        if data.get("text") == "spam":
            return error(403, "moderated")
        if data.get("text") == "flood":
            time.sleep(0.02)
        if data.get("text") == "inflate":  # a backend answering more than a client may publish
            return ok({"data": {"text": "x" * 70000}})
        with self.lock:
            number = len(self.calls)
        return ok({"data": {"text": data["text"].strip(), "id": number, "by": body["user"]}})

    def rpc(self, body: dict[str, Any]) -> Answer:
        method = body["method"]
        if method == "echo":
            return ok({"data": body["data"]})
        if method == "whoami":
            return ok({"data": {"user": body["user"], "client": body["client"]}})
        if method == "sleep":
            time.sleep(0.05)
            return ok({"data": "slept"})
        if method == "nothing":
            return ok({})
        return error(404, f"unknown method {method}")

    def slow(self, body: dict[str, Any]) -> Answer:
        time.sleep(3)
        return ok({})


@contextmanager
def backend(secret: str) -> Iterator[Backend]:
    app = Backend(secret)
    thread = threading.Thread(target=app.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app
    finally:
        app.server.shutdown()
        app.server.server_close()
        thread.join(10)
