"""Prefix-affinity benchmark: multi-turn chats through a real `llmd serve` in front of two real
llama-server replicas, routed with ``prefix-affinity`` and then with ``round-robin``.

    .venv/bin/python bench/affinity_bench.py            # 8 chats x 4 turns, concurrency 1 and 2 (~4.5 min)
    .venv/bin/python bench/affinity_bench.py --quick    # 4 chats x 3 turns, concurrency 2 (~1.5 min)

Why it matters (the issue): the second turn of a 1,650-token chat took 0.55 s to first token on
the replica that served the first turn (llama-server reused 1,655 cached tokens) and 12.2 s on the
other one. On CPU, prefill dominates time to first token, so routing a conversation back to the
replica that holds its history is worth ~10-20x.

Setup: model ``chat`` on 2 llama-server replicas pinned to CPU 0 and CPU 1 (``-t 1``), each
with 2 slots. Every chat starts with the same system prompt (as an IDE plugin sends) and a
distinct ~1,000-token source file; each later turn adds a ~150-token question, so prompts grow
from ~1,100 to ~1,500 tokens. Turns are interleaved (turn 1 of every chat, then turn 2 of every
chat, ...) in a seeded shuffled order, the way independent users' turns arrive; the order is the
same for both strategies. Each strategy gets a fresh llmd and fresh replicas, so caches start
cold.

Measured per request, client-side with the openai SDK: time to the first streamed chunk that
carries a token (content or finish_reason), and ``usage.prompt_tokens_details.cached_tokens``
from the final chunk (``stream_options.include_usage``; llama-server fills it in). After the run,
llmd's ledger (SQLite, read after llmd has flushed and exited) says which replica served each
request (joined on the ``X-Request-ID`` we send), and /metrics gives ``llmd_affinity_total``.

The process helpers (``start_llmd`` & co.) are in ``bench/harness.py``, shared with
``bench/fairness_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
from harness import (
    MODEL,
    MODEL_PATH,
    ROOT,
    Llmd,
    counter,
    install_sigterm,
    llama_launcher,
    md_table,
    pct,
    start_llmd,
    stop_llmd,
    warm_replicas,
)

# The llmd source tree to run (`python -m llmd` from there); --llmd-src compares a candidate change.
LLMD_SRC = ROOT

# --- the conversations -----------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are CodeHelper, the coding assistant built into our company's IDE. Answer in English. "
    "Be concise: prefer a short explanation followed by a code block. When you change code, show "
    "only the changed functions, with type hints and a docstring. Follow PEP 8 and the company's "
    "style guide: four-space indentation, snake_case names, no wildcard imports, f-strings for "
    "formatting, pathlib for paths, logging instead of print, and explicit exceptions instead of "
    "bare except clauses. If a question is ambiguous, state your assumption in one sentence and go "
    "on. Never invent APIs; if you are unsure that a function exists, say so. Keep secrets out of "
    "examples. Refuse to help with malware. The user works in a monorepo with Python 3.11 services, "
    "a React front end, and PostgreSQL; tests use pytest."
)

_WORDS = (
    "request response cache token prompt replica queue slot worker batch stream chunk usage limit "
    "window config reload signal drain health backoff ledger metric counter gauge latency budget"
).split()


def source_file(conv: int, lines: int) -> str:
    """A deterministic, distinct fake Python module (~11 tokens per line): the long first turn."""
    rng = random.Random(conv)
    out = [f"# file: services/{rng.choice(_WORDS)}_{conv}.py", "from __future__ import annotations", ""]
    i = 0
    while len(out) < lines:
        a, b = rng.sample(_WORDS, 2)
        out += [
            f"def {a}_{b}_{i}({a}: int, {b}: int) -> int:",
            f'    """Combine {a} and {b} for step {i}."""',
            f"    return {a} * {rng.randint(2, 99)} + {b} - {rng.randint(1, 999)}",
            "",
        ]
        i += 1
    return "\n".join(out[:lines])


def follow_up(conv: int, turn: int, words: int) -> str:
    rng = random.Random(conv * 1000 + turn)
    filler = " ".join(rng.choice(_WORDS) for _ in range(words))
    return (f"Turn {turn}: which functions above would you rename, and why? Consider these topics "
            f"from the design review: {filler}.")


@dataclass
class Turn:
    strategy: str
    concurrency: int
    conv: int
    turn: int
    request_id: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    replica: str = ""


async def one_turn(client: openai.AsyncOpenAI, messages: list[dict[str, str]], request_id: str,
                   max_tokens: int) -> tuple[float, float, str, int, int]:
    t0 = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    prompt = cached = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, seed=1, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_headers={"X-Request-ID": request_id},
    )
    async for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            # llama-server sends the role-only chunk together with the first token, but a finish
            # without any content (EOS first) also marks the end of prefill: count either.
            if ttft is None and (c.delta.content or c.finish_reason):
                ttft = time.perf_counter() - t0
            text.append(c.delta.content or "")
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
    total = time.perf_counter() - t0
    return ttft if ttft is not None else total, total, "".join(text), prompt, cached


@dataclass
class Sizes:
    conversations: int
    turns: int
    file_lines: int
    follow_up_words: int
    max_tokens: int
    concurrency: list[int]


async def drive(srv: Llmd, strategy: str, concurrency: int, sizes: Sizes) -> list[Turn]:
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    chats: list[list[dict[str, str]]] = [
        [{"role": "system", "content": SYSTEM_PROMPT},
         {"role": "user", "content": "Review this module:\n```python\n" + source_file(c, sizes.file_lines) + "\n```"}]
        for c in range(sizes.conversations)
    ]
    results: list[Turn] = []
    sem = asyncio.Semaphore(concurrency)

    async def run(c: int, t: int) -> None:
        async with sem:
            rid = f"aff-{strategy}-c{concurrency}-conv{c}-t{t}"
            ttft, total, reply, prompt, cached = await one_turn(client, chats[c], rid, sizes.max_tokens)
        chats[c].append({"role": "assistant", "content": reply})
        results.append(Turn(strategy, concurrency, c, t, rid, ttft, total, prompt, cached))

    try:
        for t in range(1, sizes.turns + 1):
            if t > 1:
                for c in range(sizes.conversations):
                    chats[c].append({"role": "user", "content": follow_up(c, t, sizes.follow_up_words)})
            # Independent users: each turn's arrival order is shuffled (seeded: same for both
            # strategies). A fixed order would let round-robin's parity line up with the number of
            # chats by accident (even -> always the same replica, odd -> always the other one).
            order = list(range(sizes.conversations))
            random.Random(t).shuffle(order)
            async with asyncio.TaskGroup() as tg:
                for c in order:
                    tg.create_task(run(c, t))
    finally:
        await client.close()
    return results


@dataclass
class RunResult:
    strategy: str
    concurrency: int
    turns: list[Turn]
    affinity: dict[str, float]
    served: dict[str, int]
    wall_s: float


def run_strategy(strategy: str, concurrency: int, sizes: Sizes, workdir: Path, llama_args: list[str]) -> RunResult:
    doc = {
        "server": {"drain_seconds": 5, "log_level": "warning"},
        "models": {MODEL: {"backend": "llama-server", "model": str(MODEL_PATH), "replicas": 2,
                           "cpus": [[0], [1 % (os.cpu_count() or 1)]], "args": llama_args}},
        "launchers": llama_launcher(),
        "routing": {"strategy": strategy, "max_queue": 256, "queue_timeout_s": 600,
                    "timeouts": {"connect_s": 5, "first_byte_s": 600, "total_s": 900}},
    }
    srv = start_llmd(doc, workdir / f"{strategy}-c{concurrency}", src=LLMD_SRC)
    try:
        warm_replicas(srv)
        t0 = time.perf_counter()
        turns = asyncio.run(drive(srv, strategy, concurrency, sizes))
        wall = time.perf_counter() - t0
        affinity = counter(srv.metrics(), "llmd_affinity_total", "result")
        served = {r["replica"]: r["served"] for r in srv.status()["replicas"]}
    finally:
        stop_llmd(srv)  # flushes the ledger: read it only after this
    with sqlite3.connect(f"file:{srv.usage_path}?mode=ro", uri=True) as db:
        where = {rid: rep for rid, rep in db.execute("SELECT request_id, replica FROM requests")}
    for t in turns:
        t.replica = where.get(t.request_id, "?")
    return RunResult(strategy, concurrency, turns, affinity, served, wall)


# --- report ----------------------------------------------------------------------------------------


@dataclass
class Summary:
    p50: float
    p90: float
    mean: float
    turn1_p50: float
    same_replica: float  # share of turns >= 2 served by the replica of the chat's previous turn
    reused: float  # share of turns >= 2 that found the chat's whole previous prompt in the cache
    computed: int  # prompt tokens prefilled (not from cache) over turns >= 2
    later: int


REUSE_SLACK = 16  # llama-server re-evaluates the last few tokens of a cached prompt


def reused_history(t: Turn, prev: Turn) -> bool:
    # The shared system prompt (~190 tokens) may be cached anywhere, and a replica visited two
    # turns ago holds an older prefix; only the chat's previous turn counts as its history.
    return t.cached_tokens >= prev.prompt_tokens - REUSE_SLACK


def summarize(r: RunResult) -> Summary:
    by = {(t.conv, t.turn): t for t in r.turns}
    later = [t for t in r.turns if t.turn >= 2]
    ttft = [t.ttft_s for t in later]
    return Summary(
        p50=statistics.median(ttft),
        p90=pct(ttft, 0.9),
        mean=statistics.fmean(ttft),
        turn1_p50=statistics.median([t.ttft_s for t in r.turns if t.turn == 1]),
        same_replica=sum(1 for t in later if t.replica == by[(t.conv, t.turn - 1)].replica) / len(later),
        reused=sum(1 for t in later if reused_history(t, by[(t.conv, t.turn - 1)])) / len(later),
        computed=sum(t.prompt_tokens - t.cached_tokens for t in later),
        later=len(later),
    )


def report(results: list[RunResult]) -> None:
    print("\n### Time to first token of turns >= 2 (client-side, streamed)\n")
    header = ("concurrency", "strategy", "turns >= 2", "TTFT p50", "TTFT p90", "TTFT mean", "turn-1 p50",
              "same replica as prev. turn", "prev. turn fully cached", "prompt tokens prefilled",
              "served per replica", "llmd_affinity_total", "wall")
    rows = []
    sums: dict[tuple[int, str], Summary] = {}
    for r in results:
        s = summarize(r)
        sums[(r.concurrency, r.strategy)] = s
        aff = ", ".join(f"{k}={int(v)}" for k, v in sorted(r.affinity.items())) or "-"
        served = " / ".join(str(v) for _, v in sorted(r.served.items()))
        rows.append([str(r.concurrency), r.strategy, str(s.later), f"{s.p50:.2f} s", f"{s.p90:.2f} s",
                     f"{s.mean:.2f} s", f"{s.turn1_p50:.2f} s", f"{s.same_replica:.0%}", f"{s.reused:.0%}",
                     str(s.computed), served, aff, f"{r.wall_s:.0f} s"])
    print("\n".join(md_table(header, rows)))
    print("\n### Ratio round-robin / prefix-affinity, turns >= 2 (goal: p50 ratio >= 5x)\n")
    ratio_rows = []
    for conc in sorted({c for c, _ in sums}):
        a, b = sums.get((conc, "prefix-affinity")), sums.get((conc, "round-robin"))
        if a and b:
            ratio = b.p50 / a.p50
            ratio_rows.append([str(conc), f"{ratio:.1f}x", f"{b.p90 / a.p90:.1f}x", f"{b.mean / a.mean:.1f}x",
                         f"{b.computed / max(1, a.computed):.1f}x", "yes" if ratio >= 5 else "NO"])
    ratio_header = ("concurrency", "p50 ratio", "p90 ratio", "mean ratio", "prefilled-tokens ratio", "goal met")
    print("\n".join(md_table(ratio_header, ratio_rows)))
    # The mechanism, independent of routing: a turn that finds its history vs one that does not.
    turns = [(t, {(u.conv, u.turn): u for u in r.turns}) for r in results for t in r.turns if t.turn >= 2]
    hit = [t.ttft_s for t, by in turns if reused_history(t, by[(t.conv, t.turn - 1)])]
    cold = [t.ttft_s for t, by in turns if t.cached_tokens < 0.5 * by[(t.conv, t.turn - 1)].prompt_tokens]
    if hit and cold:
        print(f"\nturns >= 2, all runs: previous turn fully cached: n={len(hit)}, TTFT p50 "
              f"{statistics.median(hit):.2f} s; less than half cached: n={len(cold)}, TTFT p50 "
              f"{statistics.median(cold):.2f} s ({statistics.median(cold) / statistics.median(hit):.1f}x)")
    prompts = [t.prompt_tokens for r in results for t in r.turns]
    print(f"prompt tokens per request: min {min(prompts)}, median {statistics.median(prompts):.0f}, "
          f"max {max(prompts)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 chats x 3 turns at concurrency 2 (~1.5 min)")
    ap.add_argument("--conversations", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--concurrency", type=int, nargs="+", help="concurrent requests; default 1 2 (quick: 2)")
    ap.add_argument("--strategies", nargs="+", default=["prefix-affinity", "round-robin"])
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, llmd logs, ledgers)")
    ap.add_argument("--json", type=Path, help="also write every request's measurements to this file")
    ap.add_argument("--llmd-src", type=Path, help="run llmd from this source tree (holding llmd/) instead")
    args = ap.parse_args()
    if args.llmd_src:
        global LLMD_SRC
        LLMD_SRC = args.llmd_src.resolve()
    sizes = Sizes(conversations=4 if args.quick else 8, turns=3 if args.quick else 4, file_lines=90,
                  follow_up_words=60, max_tokens=8, concurrency=[2] if args.quick else [1, 2])
    sizes.conversations = args.conversations or sizes.conversations
    sizes.turns = args.turns or sizes.turns
    sizes.concurrency = args.concurrency or sizes.concurrency
    # -np 2: two slots per replica (DESIGN.md's example); unified KV pool of -c tokens shared by
    # both slots, so 8192 holds two ~1,500-token chats at once. llama-server's RAM prompt cache
    # (--cache-ram, default 8 GiB) keeps the other chats' states, so a replica can hold them all.
    llama_args = ["-c", "8192", "-np", "2", "-t", "1"]
    install_sigterm()
    print("## affinity_bench: config")
    print(f"- model: {MODEL_PATH.name}, 2 llama-server replicas, cpus [[0], [1]], args {' '.join(llama_args)}")
    print(f"- {sizes.conversations} chats x {sizes.turns} turns, interleaved by turn (seeded shuffle), "
          f"max_tokens {sizes.max_tokens}, temperature 0; first user turn = shared {len(SYSTEM_PROMPT)}-char "
          f"system prompt + a distinct {sizes.file_lines}-line source file; later turns + "
          f"~{sizes.follow_up_words}-word question")
    print(f"- llmd from {LLMD_SRC}; strategies: {', '.join(args.strategies)}; concurrency: {sizes.concurrency}; "
          "fresh llmd + replicas "
          "per run (cold caches); routing.affinity_min_match/load_factor: llmd defaults")
    t0 = time.perf_counter()
    results: list[RunResult] = []
    tmp = Path(tempfile.mkdtemp(prefix="llmd-affinity-"))
    try:
        for conc in sizes.concurrency:
            for strategy in args.strategies:
                print(f"running {strategy} at concurrency {conc} ...", file=sys.stderr, flush=True)
                r = run_strategy(strategy, conc, sizes, tmp, llama_args)
                print(f"  done in {r.wall_s:.0f} s", file=sys.stderr, flush=True)
                results.append(r)
    finally:
        if args.keep:
            print(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(t) for r in results for t in r.turns], indent=1))
    print(f"\ntotal runtime {time.perf_counter() - t0:.0f} s (including llmd/llama-server starts)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # llmd and its replicas were stopped by the `finally` blocks
        sys.exit("interrupted; llmd and its replicas stopped")
