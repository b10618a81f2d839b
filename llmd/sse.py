"""Server-sent events as upstreams really write them: split and read, whatever the wire.

Real upstreams differ: llama-server writes ``data: {...}\\n\\n`` one event per write; others
write ``\\r\\n`` line ends, ``data:`` without the space, several events per write, or cut an
event (even a ``\\r\\n`` pair) across two reads. The splitter normalizes line ends to ``\\n``
and returns whole events, so any cut of the same bytes yields the same events; ``data_of``
reads an event's data the way the SSE spec says (optional single space, several ``data``
lines joined by ``\\n``, comment lines ignored).
"""

from __future__ import annotations


class EventSplitter:
    """Feed it the reads of an SSE body; it returns each complete event once, without its
    terminating blank line and with ``\\n`` line ends."""

    __slots__ = ("_buf", "_pending_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._pending_cr = False  # the last read ended in "\r": a "\n" starting the next one is its pair

    def feed(self, data: bytes) -> list[bytes]:
        if self._pending_cr:
            self._pending_cr = False
            if data.startswith(b"\n"):
                data = data[1:]
        if b"\r" in data:
            self._pending_cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + data if self._buf else data
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        *events, self._buf = buf.split(b"\n\n")
        return [e.lstrip(b"\n") for e in events if e.strip(b"\n")]

    def close(self) -> list[bytes]:
        """The body ended: an unterminated last event, if any (upstreams that omit the final
        blank line still meant it)."""
        rest, self._buf = self._buf.strip(b"\n"), b""
        return [rest] if rest else []


def data_of(event: bytes) -> bytes | None:
    """The event's data field (several ``data`` lines joined by ``\\n``), or None without one."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the common case, one line
    parts: list[bytes] = []
    for line in event.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if name != b"data":
            continue
        if colon and value.startswith(b" "):
            value = value[1:]
        parts.append(value)
    return b"\n".join(parts) if parts else None
