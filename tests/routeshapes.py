"""Compare two HTTP answers by shape: status, content type, and for JSON the keys and value types
(recursively, ``shape``/``shape_gaps`` of test_real_llama); for SSE the sequence of events, each
its name (``event:``) and its data's shape, runs of same-shaped events (the tokens) counted once.

Used by test_fake_routes.py (the fake against the stored captures of capture_routes.py) and
test_real_routes_shapes.py (the fake against a live llama-server, same requests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.sse import parse
from tests.test_real_llama import shape, shape_gaps


@dataclass
class Answer:
    status: int
    content_type: str  # without parameters
    body: bytes

    @property
    def is_stream(self) -> bool:
        return self.content_type == "text/event-stream"


def read_capture(path: Path) -> Answer:
    """The response part of a capture_routes.py file."""
    text = path.read_text()
    head, _, body = text.partition("\n\n")
    lines = head.splitlines()
    (status_line,) = [line for line in lines if line.startswith("HTTP/1.1 ")]
    after = lines[lines.index(status_line) + 1:]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in after)}
    return Answer(int(status_line.split()[1]), headers.get("content-type", "").split(";")[0], body.encode())


def stream_shape(body: bytes) -> list[tuple[str, Any]]:
    """(event name or "", data shape) per event, a run of equal entries counted once;
    ``[DONE]`` is kept as its own entry."""
    seq: list[tuple[str, Any]] = []
    for event in parse(body):
        entry = (event.event, "[DONE]" if event.done else shape(event.json()))
        if not seq or seq[-1] != entry:
            seq.append(entry)
    return seq


def answer_gaps(real: Answer, fake: Answer, *, compare_message: bool = True) -> list[str]:
    """Every way the fake's answer differs in shape from the real one's (empty: the same)."""
    if real.status != fake.status:
        return [f"status: real {real.status}, fake {fake.status}: {fake.body[:300]!r}"]
    if real.content_type != fake.content_type:
        return [f"content type: real {real.content_type}, fake {fake.content_type}"]
    if real.is_stream:
        real_seq, fake_seq = stream_shape(real.body), stream_shape(fake.body)
        names = ([name for name, _ in real_seq], [name for name, _ in fake_seq])
        if names[0] != names[1]:
            return [f"event order: real {names[0]}, fake {names[1]}"]
        gaps: list[str] = []
        for i, ((name, real_shape), (_, fake_shape)) in enumerate(zip(real_seq, fake_seq, strict=True)):
            gaps += shape_gaps(real_shape, fake_shape, f"event {i} {name or 'data'}")
        return gaps
    real_doc, fake_doc = json.loads(real.body), json.loads(fake.body)
    gaps = shape_gaps(shape(real_doc), shape(fake_doc))
    if not gaps and isinstance(real_doc, dict) and isinstance(real_doc.get("error"), dict):
        for key in ("type", "code") + (("message",) if compare_message else ()):
            if real_doc["error"].get(key) != fake_doc["error"].get(key):
                gaps.append(f"error.{key}: real {real_doc['error'].get(key)!r}, fake {fake_doc['error'].get(key)!r}")
    return gaps
