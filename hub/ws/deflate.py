"""permessage-deflate (RFC 7692): negotiation on the server side and the per-message codec.

Memory is the scarce resource at fan-out scale, so zlib state is created lazily: an idle
connection holds none. The server answers with ``server_no_context_takeover`` by default, which
lets every such connection share one compressed frame in a broadcast, and lets all of them share
one compressor (a full flush between messages resets its history).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from .exceptions import (
    DuplicateParameter,
    InvalidParameterName,
    InvalidParameterValue,
    NegotiationError,
    PayloadTooBig,
    ProtocolError,
)
from .headers import ExtensionParams

__all__ = ["DeflateParams", "PerMessageDeflate", "ServerPerMessageDeflateFactory"]

NAME = "permessage-deflate"
_TAIL = b"\x00\x00\xff\xff"
_WINDOW_VALUES = {str(n): n for n in range(8, 16)}


@dataclass(slots=True, frozen=True)
class DeflateParams:
    """What was agreed in the handshake, from the server's point of view."""

    server_no_context_takeover: bool
    client_no_context_takeover: bool
    server_max_window_bits: int  # our compressor's window
    client_max_window_bits: int  # the peer's window, hence our decompressor's


def parse_offer(params: ExtensionParams) -> dict[str, int | bool | None]:
    """Validate one offer's parameters; raise :class:`NegotiationError` to decline it."""
    seen: dict[str, int | bool | None] = {}
    for name, value in params:
        if name in seen:
            raise DuplicateParameter(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                raise InvalidParameterValue(name, value)
            seen[name] = True
        elif name == "server_max_window_bits":
            if value not in _WINDOW_VALUES:
                raise InvalidParameterValue(name, value)
            seen[name] = _WINDOW_VALUES[value]
        elif name == "client_max_window_bits":
            if value is None:
                seen[name] = None
            elif value in _WINDOW_VALUES:
                seen[name] = _WINDOW_VALUES[value]
            else:
                raise InvalidParameterValue(name, value)
        else:
            raise InvalidParameterName(name)
    return seen


class ServerPerMessageDeflateFactory:
    """Accepts permessage-deflate offers according to the server's preferences.

    ``client_max_window_bits`` caps the client's window when the client lets us (a smaller window
    means a smaller inflate buffer per connection); ``compress_min_size`` leaves tiny messages
    uncompressed, since deflate cannot shrink them.
    """

    name = NAME

    def __init__(
        self,
        *,
        server_no_context_takeover: bool = True,
        client_no_context_takeover: bool = False,
        server_max_window_bits: int | None = None,
        client_max_window_bits: int | None = 12,
        compress_min_size: int = 32,
        compress_level: int = 6,
        mem_level: int = 5,
    ) -> None:
        for field, value in (
            ("server_max_window_bits", server_max_window_bits),
            ("client_max_window_bits", client_max_window_bits),
        ):
            if value is not None and not 9 <= value <= 15:
                raise ValueError(f"{field} must be between 9 and 15")
        self.server_no_context_takeover = server_no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.server_max_window_bits = server_max_window_bits
        self.client_max_window_bits = client_max_window_bits
        self.compress_min_size = compress_min_size
        self.compress_level = compress_level
        self.mem_level = mem_level

    def accept(
        self, params: ExtensionParams, accepted: Sequence[object]
    ) -> tuple[ExtensionParams, PerMessageDeflate]:
        """Answer one offer. Raise :class:`NegotiationError` to decline it."""
        if any(isinstance(ext, PerMessageDeflate) for ext in accepted):
            raise NegotiationError("permessage-deflate already negotiated")
        offer = parse_offer(params)
        response: ExtensionParams = []

        server_nct = bool(offer.get("server_no_context_takeover")) or (
            self.server_no_context_takeover
        )
        if server_nct:
            response.append(("server_no_context_takeover", None))
        client_nct = bool(offer.get("client_no_context_takeover")) or (
            self.client_no_context_takeover
        )
        if client_nct:
            response.append(("client_no_context_takeover", None))

        server_bits = self.server_max_window_bits or 15
        if "server_max_window_bits" in offer:
            requested = offer["server_max_window_bits"]
            assert isinstance(requested, int)
            if requested < 9:  # zlib cannot compress with a 256-byte window
                raise InvalidParameterValue("server_max_window_bits", str(requested))
            server_bits = min(server_bits, requested)
            response.append(("server_max_window_bits", str(server_bits)))
        elif self.server_max_window_bits is not None:
            response.append(("server_max_window_bits", str(server_bits)))

        client_bits = 15
        if "client_max_window_bits" in offer:
            offered = offer["client_max_window_bits"]
            if isinstance(offered, int):
                client_bits = offered
            if self.client_max_window_bits is not None:
                client_bits = min(client_bits, self.client_max_window_bits)
            if client_bits != 15 or offered is not None:
                response.append(("client_max_window_bits", str(client_bits)))

        params_ = DeflateParams(server_nct, client_nct, server_bits, client_bits)
        return response, PerMessageDeflate(params_, self)


# Shared compressors for no-context-takeover connections, one per settings triple.
_shared: dict[tuple[int, int, int], zlib._Compress] = {}


def compress_message(data: bytes, wbits: int, level: int, mem_level: int) -> bytes:
    """Compress one whole message with no history, as any no-context-takeover peer accepts.

    ``Z_FULL_FLUSH`` ends the output on a byte boundary and forgets all history, so the next
    message compressed by the same object is independent of this one.
    """
    key = (wbits, level, mem_level)
    comp = _shared.get(key)
    if comp is None:
        comp = _shared[key] = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
    out = comp.compress(data) + comp.flush(zlib.Z_FULL_FLUSH)
    return out[:-4] if out.endswith(_TAIL) else out


class PerMessageDeflate:
    """The per-connection codec. Holds zlib objects only while they are needed."""

    __slots__ = ("_decoder", "_encoder", "factory", "params")
    name = NAME

    def __init__(self, params: DeflateParams, factory: ServerPerMessageDeflateFactory) -> None:
        self.params = params
        self.factory = factory
        self._decoder: zlib._Decompress | None = None
        self._encoder: zlib._Compress | None = None

    def __repr__(self) -> str:
        return f"PerMessageDeflate({self.params})"

    @property
    def shares_frames(self) -> bool:
        """True when a message compressed once can be sent as-is on this connection."""
        return self.params.server_no_context_takeover

    @property
    def wire_key(self) -> tuple[int, int, int] | None:
        """Connections with equal keys accept byte-identical compressed frames."""
        if not self.params.server_no_context_takeover:
            return None
        f = self.factory
        return (self.params.server_max_window_bits, f.compress_level, f.mem_level)

    # -- receiving -----------------------------------------------------------------------------

    def decompress(self, data: bytes, fin: bool, max_length: int | None) -> bytes:
        """Inflate one frame of a compressed message; ``max_length`` bounds the output."""
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = zlib.decompressobj(-self.params.client_max_window_bits)
        if fin:
            data += _TAIL
        try:
            if max_length is None:
                out = decoder.decompress(data)
            else:
                out = decoder.decompress(data, max_length + 1)
                if len(out) > max_length or decoder.unconsumed_tail:
                    raise PayloadTooBig(f"message exceeds limit of {max_length} bytes")
        except zlib.error as exc:
            raise ProtocolError(f"invalid deflate data: {exc}")
        if fin and self.params.client_no_context_takeover:
            self._decoder = None
        return out

    # -- sending -------------------------------------------------------------------------------

    def should_compress(self, size: int) -> bool:
        return size >= self.factory.compress_min_size

    def compress(self, data: bytes, fin: bool = True, whole: bool = True) -> bytes:
        """Deflate a message (``whole``) or one fragment of it."""
        f = self.factory
        p = self.params
        if whole and p.server_no_context_takeover:
            return compress_message(data, p.server_max_window_bits, f.compress_level, f.mem_level)
        encoder = self._encoder
        if encoder is None:
            encoder = self._encoder = zlib.compressobj(
                f.compress_level, zlib.DEFLATED, -p.server_max_window_bits, f.mem_level
            )
        # Every fragment is flushed, so the peer can inflate it as soon as it arrives (a
        # fragment held back in zlib until the message ends would defeat streaming); only the
        # message's last one loses the empty-block tail (RFC 7692 7.2.1).
        out = encoder.compress(data) + encoder.flush(zlib.Z_SYNC_FLUSH)
        if not fin:
            return out
        if out.endswith(_TAIL):
            out = out[:-4]
        if p.server_no_context_takeover:
            self._encoder = None
        return out
