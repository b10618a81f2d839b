"""Grounding: retrieved chunks put into a chat request, and their sources put into its answer.

The template (README "Retrieval"): one system message in front of the conversation, holding
the instruction and the chunks numbered ``[1]``, ``[2]``... in score order, each headed by its
document id. A conversation that starts with its own system message keeps it: the block is
appended to it, as text or as one more text part (chat templates such as Gemma's accept a
single system message, first).

The answer keeps OpenAI's shape plus a ``rag`` field: the collection, the sources (number,
document id, chunk, score, metadata) and what retrieval cost. A stream gets the same object
as one last chunk (``choices: []``, like the usage chunk) right before ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import bad_request
from .vectors import Hit

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

INSTRUCTION = (
    "Answer the user's question using only the numbered sources below. Cite the sources you use "
    "by their number in brackets, like [1]. If the sources do not contain the answer, say so."
)


def query_of(messages: list[Any]) -> str:
    """What to retrieve for: the text of the last user message (string, or its text parts)."""
    for m in reversed(messages):
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            # a part's text that is not a string (5, null, a list) is no text: not a TypeError (a 500)
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            text = " ".join(t for t in texts if isinstance(t, str))
        else:
            text = ""
        if text.strip():
            return text.strip()
        break
    raise bad_request("A grounded chat needs a last user message with text to retrieve for.", param="messages")


def sources_block(hits: list[Hit]) -> str:
    if not hits:
        return INSTRUCTION + "\n\n(no sources were found)"
    parts = [INSTRUCTION]
    for n, h in enumerate(hits, 1):
        parts.append(f"[{n}] (document {h.doc_id})\n{h.text}")
    return "\n\n".join(parts)


def grounded(messages: list[Any], hits: list[Hit]) -> list[Any]:
    """The conversation with the sources' system message in front (or appended to its own)."""
    block = sources_block(hits)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        content = first.get("content")
        if isinstance(content, str):
            return [{**first, "content": content + "\n\n" + block}, *messages[1:]]
        if isinstance(content, list):  # text parts (the SDKs send them too): one more part
            return [{**first, "content": [*content, {"type": "text", "text": "\n\n" + block}]}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def rag_field(collection: str, hits: list[Hit], embed_tokens: int, timings_ms: dict[str, float]) -> dict[str, Any]:
    return {
        "collection": collection,
        "sources": [
            {"n": n, "id": h.doc_id, "chunk": h.chunk, "score": round(h.score, 6), "metadata": h.metadata}
            for n, h in enumerate(hits, 1)
        ],
        "usage": {"embedding_tokens": embed_tokens},
        "timings_ms": timings_ms,
    }


class Sources:
    """The call's ``Rewrite``: the ``rag`` field into a whole answer, or as the stream's last
    chunk before ``[DONE]`` (with the stream's id, created and model)."""

    def __init__(self, rag: dict[str, Any]) -> None:
        self.rag = rag
        self.head: dict[str, Any] | None = None

    def whole(self, data: bytes) -> bytes:
        try:
            doc = _decode(data)
        except msgspec.DecodeError:
            return data
        if not isinstance(doc, dict):
            return data
        doc["rag"] = self.rag
        return _encode(doc)

    def event(self, payload: bytes) -> bytes:
        if payload.strip() == b"[DONE]":
            last = {**(self.head or {}), "object": "chat.completion.chunk", "choices": [], "rag": self.rag}
            return _encode(last) + b"\n\ndata: [DONE]"
        if self.head is None and payload.startswith(b"{"):
            try:
                doc = _decode(payload)
            except msgspec.DecodeError:
                return payload
            if isinstance(doc, dict):
                self.head = {k: doc[k] for k in ("id", "created", "model") if k in doc}
        return payload
