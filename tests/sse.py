"""A spec-compliant SSE reader for tests (WHATWG "event stream" parsing), so that assertions
about streams hold whatever framing the upstream used: CRLF, CR or LF line ends, ``data:`` with
or without its space, comments, events cut anywhere across reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    data: str
    comment: bool = False
    event: str = ""  # the "event:" field (Anthropic and Responses streams name every event)

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseParser:
    """Feed bytes as they arrive; ``feed`` returns the events completed by them."""

    _buf: str = ""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _saw_cr: bool = False

    def feed(self, chunk: bytes) -> list[Event]:
        text = chunk.decode()
        if self._saw_cr and text.startswith("\n"):
            text = text[1:]  # the "\n" of a "\r\n" cut between two reads
        self._saw_cr = text.endswith("\r")
        self._buf += text.replace("\r\n", "\n").replace("\r", "\n")
        events: list[Event] = []
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line == "":
                if self._data:
                    events.append(Event("\n".join(self._data), event=self._event))
                    self._data = []
                self._event = ""
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
        return events


def parse(raw: bytes) -> list[Event]:
    """Every event of a whole stream body."""
    return SseParser().feed(raw)


def payloads(raw: bytes) -> list[Any]:
    """The JSON data of every event but ``[DONE]``."""
    return [e.json() for e in parse(raw) if not e.done]


def is_token_chunk(doc: Any) -> bool:
    """A chat/completions chunk that carries one generated token: content, a tool-call piece
    or completion text (not the role announcement, not usage, not an error)."""
    if not isinstance(doc, dict) or "error" in doc:
        return False
    for choice in doc.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
        if choice.get("text"):
            return True
    return False
