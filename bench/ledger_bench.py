"""How many usage rows per second the ledger writes (write-behind batches into SQLite, WAL,
synchronous=NORMAL), and what record() costs on the request path.

    .venv/bin/python bench/ledger_bench.py [--rows 200000]

The relay's throughput with the ledger on vs off is measured by relay_bench.py's scratch-copy
A/B (`--candidate` with `usage.enabled: false`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, md_table

sys.path.insert(0, str(ROOT))  # this checkout's llmd, also without an installed package

from llmd.config import UsageConfig
from llmd.schema import UsageRow
from llmd.usage import Ledger


def row(i: int) -> UsageRow:
    return UsageRow(ts=time.time(), request_id=f"r{i}", key_id=f"key{i % 20}", tier="standard",
                    model=f"m{i % 3}", replica="m/0", route="chat", status=200, stream=bool(i % 2),
                    outcome="ok", prompt_tokens=100, completion_tokens=20, duration_ms=12.5, ttft_ms=3.1)


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(UsageConfig(path=str(Path(tmp) / "u.sqlite3"), flush_ms=50, max_pending_rows=n + 1))
        await ledger.open()
        rows = [row(i) for i in range(n)]
        t0 = time.perf_counter()
        for r in rows:
            ledger.record(r)
        t_record = time.perf_counter() - t0
        t1 = time.perf_counter()
        while ledger.pending_rows:
            await ledger.flush()
        t_write = time.perf_counter() - t1
        await ledger.close()
        table = [
            ("rows", f"{n:,}"),
            ("record() on the request path", f"{t_record / n * 1e6:.2f} us/row"),
            ("rows written per second (batched transactions + monthly rollup)", f"{n / t_write:,.0f}"),
            ("flushes", str(ledger.flushes)),
        ]
        print("\n".join(md_table(("what", "value"), table, "lr")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    asyncio.run(main(ap.parse_args().rows))
