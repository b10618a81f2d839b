"""Run the fault matrix (tests/test_fault_matrix.py) and print it as a table.

    .venv/bin/python bench/fault_matrix.py [-k EXPR] [--markdown] [extra pytest args...]

Each test of the module appends one JSON line per fault (fault, expected, seen, rows_lost) to the
file named by $LLMD_FAULT_MATRIX, pass or fail; this script points that at a temporary file,
runs pytest on the module, then prints the rows in the order they ran, with the run time and
pytest's exit status (which is also this script's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from harness import ROOT, md_table

MODULE = "tests/test_fault_matrix.py"
COLUMNS = (("fault", 34), ("expected", 40), ("seen", 70), ("rows lost", 9))


def table(rows: list[dict[str, object]]) -> str:
    """Plain text, cells wrapped to their column width."""
    lines = ["  ".join(name.upper().ljust(w) for name, w in COLUMNS).rstrip(),
             "  ".join("-" * w for _, w in COLUMNS)]
    for r in rows:
        cells = [textwrap.wrap(str(r.get(k.replace(" ", "_"), "")), w) or [""] for k, w in COLUMNS]
        for i in range(max(len(c) for c in cells)):
            parts = ((c[i] if i < len(c) else "").ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))
            lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def markdown(rows: list[dict[str, object]]) -> str:
    cells = [[str(r.get(k, "")).replace("|", "\\|") for k in ("fault", "expected", "seen", "rows_lost")] for r in rows]
    return "\n".join(md_table(("fault", "expected", "seen", "rows lost"), cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", dest="expr", help="only the tests matching this pytest -k expression")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "matrix.jsonl"
        out.touch()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", MODULE, *extra]
        if args.expr:
            cmd += ["-k", args.expr]
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "LLMD_FAULT_MATRIX": str(out)})
        elapsed = time.monotonic() - t0
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    print()
    print(markdown(rows) if args.markdown else table(rows))
    lost = sum(int(r.get("rows_lost") or 0) for r in rows)
    failed = sum(str(r.get("seen", "")).startswith("FAILED") for r in rows)
    known = sum(str(r.get("seen", "")).startswith("KNOWN BUG") for r in rows)
    print(f"\n{len(rows)} faults, {failed} failed, {known} known bugs (xfail), {lost} rows lost in all; "
          f"pytest exit {done.returncode} in {elapsed:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
