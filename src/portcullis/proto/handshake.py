"""What the local proxies' handshakes (SOCKS5, HTTP CONNECT) share: one request taken
exactly once, the bytes the application sent after it, and the bytes to answer with.

Sans I/O, like the codecs that build on it: never reads a socket or a clock.
"""

from __future__ import annotations

from typing import Generic, TypeVar

RequestT = TypeVar("RequestT")


class ProxyHandshake(Generic[RequestT]):
    def __init__(self) -> None:
        self._output = bytearray()
        self._payload = bytearray()  # bytes after the request: they belong to the stream
        self._request: RequestT | None = None
        self._request_taken = False
        self._failure: str | None = None

    def next_request(self) -> RequestT | None:
        """The parsed request, exactly once; None before, after, and once failed."""
        if self._request is None or self._request_taken or self._failure is not None:
            return None
        self._request_taken = True
        return self._request

    def take_payload(self) -> bytes:
        """Take the bytes the client sent after its request (empty until it is parsed)."""
        payload = bytes(self._payload)
        self._payload.clear()
        return payload

    def data_to_send(self) -> bytes:
        """Take the bytes to write to the client, in order."""
        output = bytes(self._output)
        self._output.clear()
        return output
