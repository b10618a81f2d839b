"""OpenAI's legacy function calling, for old clients against engines that know only tools.

The request's ``functions`` / ``function_call`` go upstream as ``tools`` / ``tool_choice``
(envelope.functions_to_tools); this module turns the answer back: the first tool call of a
message (or of a stream delta) becomes its ``function_call``, and the finish reason
``tool_calls`` becomes ``function_call``, as the old API answered.
"""

from __future__ import annotations

from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _message(msg: Any) -> None:
    if not isinstance(msg, dict):
        return
    calls = msg.pop("tool_calls", None)
    if isinstance(calls, list) and calls and isinstance(calls[0], dict):
        fn = calls[0].get("function")
        if isinstance(fn, dict):
            msg["function_call"] = {k: v for k, v in fn.items() if k in ("name", "arguments")}


def _choices(doc: Any, key: str) -> bool:
    if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
        return False
    for c in doc["choices"]:
        if not isinstance(c, dict):
            continue
        _message(c.get(key))
        if c.get("finish_reason") == "tool_calls":
            c["finish_reason"] = "function_call"
    return True


class LegacyFunctions:
    """Rewrites a chat answer from tools back to functions (whole, or one stream event)."""

    def whole(self, data: bytes) -> bytes:
        try:
            doc = _decode(data)
        except msgspec.DecodeError:
            return data
        return _encode(doc) if _choices(doc, "message") else data

    def event(self, payload: bytes) -> bytes:
        if b"tool_calls" not in payload:
            return payload
        try:
            doc = _decode(payload)
        except msgspec.DecodeError:
            return payload
        return _encode(doc) if _choices(doc, "delta") else payload


LEGACY_FUNCTIONS = LegacyFunctions()
