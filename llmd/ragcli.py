"""``llmd rag add / ls / rm / search``: the retrieval routes from a terminal.

A client of a running llmd (its /v1/rag routes), not of the store: documents are embedded by
llmd's own embeddings model, through the key's limits and into the ledger like any request.
The key comes from ``--key`` or ``$LLMD_API_KEY``; the URL from ``--url`` or the config.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import configfile
from .progress import Progress

FILES_PER_REQUEST = 8  # one POST carries this many files (each embedded in llmd's batches)


class CliError(Exception):
    pass


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    try:
        cfg = configfile.load(args.config)
        host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{cfg.server.port}"
    except config_mod.ConfigError:
        return "http://127.0.0.1:8000"


def request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url(args) + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    key = args.key or os.environ.get("LLMD_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            msg = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = raw[:500]
        raise CliError(f"llmd answered {e.code}: {msg}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        # ValueError: a --url urllib cannot open; HTTPException: something not HTTP answered there
        raise CliError(f"cannot reach llmd at {base_url(args)}: {type(e).__name__}: {e}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError(f"{base_url(args)} did not answer JSON: is it llmd?") from None


def pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise CliError(f"{what} {item!r}: expected key=value")
        out[k] = v
    return out


def cmd_add(args: argparse.Namespace) -> int:
    meta = pairs(args.metadata, "--metadata")
    docs: list[tuple[str, str]] = []
    for name in args.files:
        p = Path(name)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CliError(f"{name}: not a UTF-8 text file") from None
        except OSError as e:
            raise CliError(f"{name}: {e.strerror}") from None
        if "\x00" in text:  # valid UTF-8 is not yet text: a file of zeros decodes too
            raise CliError(f"{name}: not a text file (it holds NUL bytes)")
        if not text.strip():
            raise CliError(f"{name}: empty")
        docs.append((name, text))
    coll = urllib.parse.quote(args.collection, safe="")
    chunks = tokens = 0
    with Progress(f"embedding into {args.collection}", total=len(docs), unit="files") as bar:
        for i in range(0, len(docs), FILES_PER_REQUEST):
            part = docs[i : i + FILES_PER_REQUEST]
            body = {"texts": [t for _, t in part], "ids": [n for n, _ in part],
                    "metadata": [{"source": n, **meta} for n, _ in part]}  # fmt: skip
            try:
                got = request(args, "POST", f"/v1/rag/{coll}/documents", body)
            except CliError as e:  # llmd names texts[i] of this request: name the file
                raise CliError(re.sub(r"texts\[(\d+)\]", lambda m, part=part: part[int(m[1])][0], str(e))) from None
            chunks += sum(d["chunks"] for d in got["data"])
            tokens += got["usage"]["prompt_tokens"]
            bar.advance(len(part))
    print(f"{len(docs)} document(s), {chunks} chunk(s), {tokens} embedding token(s) in {args.collection}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    if not args.collection:
        rows = [[c["id"], str(c["documents"]), str(c["dimension"] or "-"), c["embedding_model"],
                 c["chat_model"] or "-", c["store"]] for c in request(args, "GET", "/v1/rag")["data"]]  # fmt: skip
        table(("collection", "documents", "dimension", "embedding_model", "chat_model", "store"), rows)
        return 0
    coll = urllib.parse.quote(args.collection, safe="")
    after = ""
    rows = []
    while True:
        q = urllib.parse.urlencode({"limit": 1000, **({"after": after} if after else {})})
        page = request(args, "GET", f"/v1/rag/{coll}/documents?{q}")
        rows += [[d["id"], str(d["chunks"]), json.dumps(d["metadata"])] for d in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    table(("id", "chunks", "metadata"), rows)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    coll = urllib.parse.quote(args.collection, safe="")
    for doc_id in args.ids:
        got = request(args, "DELETE", f"/v1/rag/{coll}/documents/{urllib.parse.quote(doc_id, safe='')}")
        if got["deleted"] is not True:
            raise CliError(f"llmd did not delete {doc_id}: {got}")
        print(f"deleted {doc_id}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    coll = urllib.parse.quote(args.collection, safe="")
    body: dict[str, Any] = {"query": args.query, "filter": pairs(args.filter, "--filter")}
    if args.top_k:
        body["top_k"] = args.top_k
    got = request(args, "POST", f"/v1/rag/{coll}/search", body)
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    for h in got["data"]:
        text = " ".join(h["text"].split())
        print(f"{h['score']:.4f}  {h['id']}#{h['chunk']}  {text[:100]}{'...' if len(text) > 100 else ''}")
    return 0


def table(cols: tuple[str, ...], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def add_parser(sub: Any, config_arg: Any) -> None:
    p = sub.add_parser("rag", help="retrieval collections of a running llmd: add, ls, rm, search")
    rs = p.add_subparsers(dest="rag_cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        config_arg(q)
        q.add_argument("--url", help="llmd's base URL (default: from the config)")
        q.add_argument("--key", help="API key (default: $LLMD_API_KEY)")
        q.add_argument("--timeout", type=float, default=600, help="seconds per request (default 600)")

    q = rs.add_parser("add", help="add text and Markdown files (id: the path as given; re-adding replaces)")
    q.add_argument("collection")
    q.add_argument("files", nargs="+")
    q.add_argument("--metadata", action="append", metavar="K=V", help="metadata of every file (repeatable)")
    common(q)
    q.set_defaults(func=run(cmd_add))

    q = rs.add_parser("ls", help="the collections, or one collection's documents")
    q.add_argument("collection", nargs="?")
    common(q)
    q.set_defaults(func=run(cmd_ls))

    q = rs.add_parser("rm", help="delete documents by id")
    q.add_argument("collection")
    q.add_argument("ids", nargs="+")
    common(q)
    q.set_defaults(func=run(cmd_rm))

    q = rs.add_parser("search", help="the chunks closest to a query")
    q.add_argument("collection")
    q.add_argument("query")
    q.add_argument("--top-k", type=int)
    q.add_argument("--filter", action="append", metavar="K=V", help="metadata the documents must have")
    q.add_argument("--json", action="store_true")
    common(q)
    q.set_defaults(func=run(cmd_search))


def run(cmd: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(cmd(args))
        except CliError as e:
            print(f"llmd rag: {e}", file=sys.stderr)
            return 1
        except (KeyError, TypeError, IndexError) as e:  # JSON, but not the answer of llmd's route
            print(f"llmd rag: unexpected answer from {base_url(args)} ({type(e).__name__}: {e}): is it llmd?",
                  file=sys.stderr)  # fmt: skip
            return 1

    return wrapped
