"""Chunker: a document's text cut into overlapping pieces an embeddings model takes whole.

Sizes are in tokens estimated at 4 characters each (what llmd's limits assume too): asking the
model to tokenize every document would cost a model call per document for a boundary that
need not be exact. A chunk ends at the last paragraph break, else line break, else space
inside its budget, so words are not cut unless one is longer than a whole chunk.
"""

from __future__ import annotations

CHARS_PER_TOKEN = 4


def chunks(text: str, tokens: int, overlap: int) -> list[str]:
    """``text`` as chunks of at most ``tokens`` (estimated), each starting about ``overlap``
    tokens (at most half the previous chunk) before the previous one ended. Blank text has no
    chunks."""
    size = tokens * CHARS_PER_TOKEN
    back = overlap * CHARS_PER_TOKEN
    text = text.strip()
    out: list[str] = []
    start = 0
    n = len(text)
    while start < n:
        end = min(n, start + size)
        if end < n:
            end = _boundary(text, start, end)
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        if end >= n:
            break
        # at most half of this chunk goes again: a chunk cut short at a break past its middle,
        # with an overlap above half a chunk, would otherwise start the next one a word later
        # (a document became chunks x 50 and as many embeddings)
        nxt = max(end - min(back, (end - start) // 2), start + 1)
        if back:
            # the overlap starts at a word, not inside one
            space = text.find(" ", nxt, end)
            nxt = space + 1 if space != -1 else nxt
        start = nxt
    return out


def _boundary(text: str, start: int, end: int) -> int:
    """The best cut in ``text[start:end]``: its last paragraph, line or word break past the
    middle of the chunk, else ``end`` (a word longer than half a chunk is cut)."""
    floor = start + (end - start) // 2
    for sep in ("\n\n", "\n", ". ", " "):
        i = text.rfind(sep, floor, end)
        if i != -1:
            return i + len(sep)
    return end


def tail(text: str, tokens: int) -> str:
    """The end of ``text``: at most ``tokens`` (estimated), starting at a word when one
    starts in the first half of it."""
    text = text.strip()
    size = tokens * CHARS_PER_TOKEN
    if len(text) <= size:
        return text
    cut = text[-size:]
    space = cut.find(" ", 0, size // 2)
    return cut[space + 1 :].strip() if space != -1 else cut.strip()
