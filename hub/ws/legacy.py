"""The older websockets server API: ``WebSocketServerProtocol`` and its overridable hooks.

Code written for ``websockets.server.serve(ws_handler, ..., create_protocol=Subclass)``
customises the opening handshake by subclassing the connection class and overriding
``process_request(path, request_headers)`` or ``select_subprotocol(client_subprotocols,
server_subprotocols)``. Here that class is a :class:`ServerConnection`, so a handler written
for either API gets the same object; :func:`serve` takes ``create_protocol=`` as another name for
``create_connection=`` and the server consults these two hooks when the connection is one of
these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .connection import ServerConnection
from .headers import Headers

__all__ = ["WebSocketServerProtocol"]


class WebSocketServerProtocol(ServerConnection):
    """A server connection whose handshake hooks are methods, as in the older API."""

    __slots__ = ()

    async def process_request(self, path: str, request_headers: Headers) -> Any:
        """Return ``None`` to go on with the handshake, or ``(status, headers, body)`` (or a
        :class:`Response`) to answer with instead. Runs before the ``process_request`` given to
        ``serve()``; the default does nothing."""
        return None

    def select_subprotocol(
        self, client_subprotocols: Sequence[str], server_subprotocols: Sequence[str]
    ) -> str | None:
        """Pick one of the client's subprotocols, or ``None`` for none. The default is the
        server's rule (the client's most preferred one the server supports)."""
        return self.protocol.select_subprotocol(client_subprotocols)


def overrides_select(connection: ServerConnection) -> bool:
    """Whether ``connection`` is a legacy subclass with its own ``select_subprotocol``."""
    return (
        isinstance(connection, WebSocketServerProtocol)
        and type(connection).select_subprotocol is not WebSocketServerProtocol.select_subprotocol
    )
