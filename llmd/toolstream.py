"""ToolStream: a tool loop's rounds, streamed live into the client's one SSE stream.

Every round of a streamed tool loop (toolloop.py) is streamed upstream, and the relay hands
its events here instead of writing them itself (``Call.sink``). Text reaches the client as the
model writes it, in every round. What the client must see only once, or only when the loop is
over, is held back: tool-call deltas (a server tool's call is llmd's to run; a client tool's
goes out when the loop ends), the finish chunk, the usage chunk (the loop sends the sum of all
rounds) and ``[DONE]``. Every chunk carries the first round's id, ``created`` and ``model``,
so the client reads one completion.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

# Fields of the first round's first chunk that every chunk the client sees carries.
_SAME = ("id", "created", "model", "system_fingerprint")


class ToolStream:
    def __init__(self, out: web.StreamResponse) -> None:
        self.out = out
        self.base: dict[str, Any] | None = None
        self.role_sent = False
        self.new_round()

    def new_round(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}  # tool calls by their index, pieces joined
        self.text: list[str] = []
        self.finish: str | None = None

    # --- the relay's side: one upstream event in, what the client gets out -------------------------

    def event(self, payload: bytes) -> bytes | None:
        if payload.strip() == b"[DONE]":
            return None
        try:
            doc = _decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return b"data: " + payload + b"\n\n"  # not a chunk: the client judges it, as on a relay
        if not isinstance(doc, dict) or "error" in doc:
            return b"data: " + payload + b"\n\n"  # an in-band error (the meter marked the round)
        if self.base is None:
            self.base = {k: doc[k] for k in _SAME if k in doc}
        choices = doc.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None  # the usage chunk: the loop sends the sum of every round's
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        for piece in delta.pop("tool_calls", None) or ():
            self._hold(piece)
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
            choice["finish_reason"] = None
        if self.role_sent:
            delta.pop("role", None)
        elif delta.get("role"):
            self.role_sent = True
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        if not any(v not in (None, "") for v in delta.values()):
            return None  # nothing left for the client in this chunk
        choice["delta"] = delta
        doc.pop("usage", None)
        doc.pop("timings", None)
        doc.update(self.base)
        return b"data: " + _encode(doc) + b"\n\n"

    def _hold(self, piece: Any) -> None:
        if not isinstance(piece, dict):
            return
        index = piece.get("index", len(self.calls))
        call = self.calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if piece.get("id"):
            call["id"] = piece["id"]
        fn = piece.get("function")
        if isinstance(fn, dict):
            if fn.get("name"):
                call["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["function"]["arguments"] += fn["arguments"]

    # --- the loop's side ---------------------------------------------------------------------------

    def message(self) -> dict[str, Any]:
        """The round's assistant message, as a whole answer would have carried it."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message

    def ending(self, tool_calls: list[Any], finish: str, usage: dict[str, int] | None) -> bytes:
        """The events that end the client's stream: the client's own tool calls, the one finish
        chunk, the summed usage when asked for, ``[DONE]``."""
        base = {**(self.base or {}), "object": "chat.completion.chunk"}
        events: list[dict[str, Any]] = []
        if tool_calls:
            delta: dict[str, Any] = {"tool_calls": [{"index": i, **c} for i, c in enumerate(tool_calls)]}
            if not self.role_sent:
                delta["role"] = "assistant"
            events.append({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if usage is not None:
            events.append({**base, "choices": [], "usage": usage})
        return b"".join(b"data: " + _encode(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
