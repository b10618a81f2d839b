"""Progress lines: one per step's start and end off a TTY, one redrawn line on a TTY."""

import io

import pytest

from llmd.progress import Progress


def test_not_a_tty_writes_one_line_at_start_and_end() -> None:
    out = io.StringIO()
    with Progress("embedding docs", total=4, unit="chunks", stream=out, tty=False) as p:
        for _ in range(4):
            p.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "embedding docs: started (4 chunks)"
    assert lines[1].startswith("embedding docs: done, 4/4 chunks (100%) in ")
    assert len(lines) == 2 and "\r" not in out.getvalue()


def test_tty_redraws_in_place_and_ends_with_a_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(Progress, "REDRAW_S", 0.0)
    with Progress("copying", total=2, stream=out, tty=True) as p:
        p.advance()
        p.advance()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") >= 3
    assert "2/2 (100%)" in text
    assert text.splitlines()[-1].startswith("copying: done, 2/2 (100%) in ")


def test_a_failed_step_says_so() -> None:
    out = io.StringIO()
    with pytest.raises(ValueError), Progress("build", stream=out, tty=False):
        raise ValueError("boom")
    assert "build: failed (ValueError), 0 in " in out.getvalue()
