"""Schema fuzzing at volume: 10,000+ schemathesis-generated requests against llmd over the fake.

    .venv/bin/python bench/fuzz_bench.py                  # 10,000 requests, 4 senders at once
    .venv/bin/python bench/fuzz_bench.py -n 20000 -w 1    # one at a time
    .venv/bin/python bench/fuzz_bench.py --seed 7         # another deterministic sequence

The same machinery as tests/test_fuzz.py (tests/fuzzing.py): a fake llama-server child process
as the upstream, llmd in this process, requests generated from llmd's own /openapi.json in
schemathesis's positive and negative modes with five identities. Each worker thread runs its
One thread generates (hypothesis is not for threads); ``--workers`` threads send, each with
its own session, so with several the requests overlap and max_concurrent, the admission queue
and concurrent settlement are exercised too.

Prints a table (requests, by status, llmd's own 5xx, ledger rows vs expected, leaks, time)
and the first findings; exits 1 if anything is wrong (an llmd 5xx, a 4xx outside the
envelope, a conformance failure, a ledger mismatch, a leak, an llmd error logged).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's llmd and tests/, whatever is installed

from tests import fuzzing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--requests", type=int, default=10_000, help="requests in all (default 10000)")
    ap.add_argument("-w", "--workers", type=int, default=4, help="client threads sending at once (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="0: hypothesis's derandomized sequence")
    ap.add_argument("--max-body-bytes", type=int, default=4096, help="llmd's server.max_body_bytes (413s)")
    args = ap.parse_args()
    logging.getLogger("llmd.access").setLevel(logging.WARNING)  # 10,000 access lines are noise here
    logging.basicConfig(level=logging.ERROR)

    t0 = time.monotonic()

    def progress(n: int) -> None:
        if n % 1000 == 0:
            print(f"  {n} requests, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="llmd-fuzz-") as tmp,
        fuzzing.Stack(Path(tmp), args.max_body_bytes) as stack,
    ):
        found = fuzzing.fuzz(stack, args.requests, seed=args.seed, workers=args.workers, progress=progress)
        wall = time.monotonic() - t0
        state = stack.settle()
        db = fuzzing.ledger_path(stack)
        rows = fuzzing.ledger_rows(db)
        outcomes = fuzzing.rows_by(db, "outcome")
        unexplained = fuzzing.unexplained_aborts(db, found)
        errors = [r.getMessage() for r in stack.errors]

    expected = found.expected_rows()
    by_status = found.by_status()
    own_5xx = sum(1 for s in found.sent if fuzzing.llmd_own_5xx(s))
    relayed_5xx = sum(1 for s in found.sent if s.status >= 500) - own_5xx
    mismatch = list(fuzzing.ledger_mismatch(expected, rows))
    leaks = fuzzing.leaks(state)
    by_route = Counter(s.path for s in found.sent)

    table = [
        ("requests", f"{len(found.sent)} ({args.workers} worker{'s' * (args.workers > 1)})"),
        ("by status", "  ".join(f"{k}: {v}" for k, v in sorted(by_status.items()))),
        ("by route", "  ".join(f"{k}: {v}" for k, v in sorted(by_route.items()))),
        ("llmd's own 5xx", str(own_5xx)),
        ("upstream 5xx relayed", str(relayed_5xx)),
        ("4xx outside the envelope", str(sum(1 for p in found.problems if p.startswith("4xx")))),
        ("other per-response problems", str(sum(1 for p in found.problems if not p.startswith(("4xx", "llmd 5xx"))))),
        ("conformance failures", str(sum(found.conformance.values()))),
        (
            "ledger rows vs expected",
            f"{sum(rows.values())} vs {sum(expected.values())}" + (" (mismatch)" * bool(mismatch)),
        ),
        ("ledger outcomes", "  ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))),
        (
            "streams the client cut short",
            f"{sum(s.cut_short for s in found.sent)} (schemathesis reads 20 events); "
            f"client_abort rows not among them: {len(unexplained)}",
        ),
        ("leaked (limiter, quota, slots, queue)", ", ".join(leaks) or "none"),
        ("llmd errors logged", str(len(errors))),
        ("time", f"{wall:.1f} s ({len(found.sent) / wall:.0f} requests/s, generation included)"),
    ]
    width = max(len(k) for k, _ in table)
    print(f"\n{'what':<{width}}  value\n{'-' * width}  -----")
    for k, v in table:
        print(f"{k:<{width}}  {v}")
    for line in mismatch:
        print("ledger:", line)
    for p in found.problems[:5]:
        print("\n" + p)
    for name, example in found.conformance_examples.items():
        print(f"\nconformance {name}:\n{example}")
    for e in errors[:5]:
        print("\nllmd error:", e)
    bad = own_5xx or found.problems or found.conformance or mismatch or leaks or errors or unexplained
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
