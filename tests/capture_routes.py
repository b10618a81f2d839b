"""Re-capture what a running llama-server answers on the routes llmd relays besides chat,
completions and embeddings, into tests/data/observed/llama-server/routes/ (one file per exchange).

    bin/llama-server -m models/gemma-3-270m-q4_k_m.gguf --jinja -c 2048 -np 2 -t 1 --port 18931
    bin/llama-server -m models/gemma-3-270m-q4_k_m.gguf --reranking -c 1024 -np 1 -t 1 --port 18932
    .venv/bin/python tests/capture_routes.py --chat http://127.0.0.1:18931 --rerank http://127.0.0.1:18932

Each file is ``### METHOD PATH``, ``> `` and the request body, then the response as received
(status line, headers, a blank line, the body; a stream's body is its raw SSE). Requests ask for
``temperature: 0`` where the route samples, so that a re-capture changes little. The same
requests (``CAPTURES``) are what tests/test_real_routes_shapes.py sends to the real server and to
the fake.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "data" / "observed" / "llama-server" / "routes"

SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Say hello"}]
LLAMA_VSCODE_INFILL = {
    # what llama.vscode sends (its "fim" request), extra context chunks included
    "input_prefix": "def add(a, b):\n    ",
    "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}],
    "prompt": "",
    "n_predict": 8,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings", "tokens_cached", "truncated", "stop_type", "stopping_word"],
}
RERANK = {"query": "What is the capital of France?",
          "documents": ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel Tower"],
          "top_n": 3}


@dataclass(frozen=True)
class Capture:
    name: str  # the file name, without .http.txt
    server: str  # "chat" (a --jinja chat server) or "rerank" (a --reranking server)
    method: str
    path: str
    body: Any = None  # JSON, or bytes sent as they are
    live: bool = True  # False: too slow to ask a real server on every test run (stored capture only)


CAPTURES: list[Capture] = [
    # Anthropic Messages
    Capture("messages", "chat", "POST", "/v1/messages",
            {"model": "gemma-3-270m", "system": SYSTEM, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}),
    Capture("messages_stream", "chat", "POST", "/v1/messages",
            {"model": "gemma-3-270m", "system": SYSTEM, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
             "stream": True}),
    Capture("messages_blocks", "chat", "POST", "/v1/messages",
            {"model": "gemma-3-270m", "system": [{"type": "text", "text": SYSTEM}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}],
             "max_tokens": 4, "temperature": 0}),
    Capture("messages_count_tokens", "chat", "POST", "/v1/messages/count_tokens",
            {"model": "gemma-3-270m", "system": SYSTEM, "messages": MESSAGES}),
    # no max_tokens: llama.cpp is permissive and asks for 4096 (n_predict is not read): the real
    # one generated until its 1024-token slot was full, ~1 min on 2 cores
    Capture("messages_no_max_tokens", "chat", "POST", "/v1/messages",
            {"model": "gemma-3-270m", "messages": MESSAGES, "temperature": 0, "n_predict": 4}, live=False),
    Capture("err_messages_missing_messages", "chat", "POST", "/v1/messages",
            {"model": "gemma-3-270m", "max_tokens": 8}),
    Capture("err_messages_not_array", "chat", "POST", "/v1/messages",
            {"model": "gemma-3-270m", "messages": "hi", "max_tokens": 8}),
    Capture("err_messages_malformed_json", "chat", "POST", "/v1/messages", b"{nope"),
    # OpenAI Responses
    Capture("responses", "chat", "POST", "/v1/responses",
            {"model": "gemma-3-270m", "instructions": SYSTEM, "input": "Say hello", "max_output_tokens": 8,
             "temperature": 0}),
    Capture("responses_stream", "chat", "POST", "/v1/responses",
            {"model": "gemma-3-270m", "instructions": SYSTEM, "input": "Say hello", "max_output_tokens": 8,
             "temperature": 0, "stream": True}),
    Capture("responses_messages", "chat", "POST", "/v1/responses",
            {"model": "gemma-3-270m", "input": [{"role": "user", "content": "Say hello"}], "max_output_tokens": 4,
             "temperature": 0}),
    Capture("responses_input_tokens", "chat", "POST", "/v1/responses/input_tokens",
            {"model": "gemma-3-270m", "instructions": SYSTEM, "input": "Say hello"}),
    Capture("err_responses_missing_input", "chat", "POST", "/v1/responses",
            {"model": "gemma-3-270m", "max_output_tokens": 8}),
    Capture("err_responses_input_not_string_or_array", "chat", "POST", "/v1/responses",
            {"model": "gemma-3-270m", "input": 5, "max_output_tokens": 8}),
    # llama.cpp native
    Capture("err_infill_no_fim", "chat", "POST", "/infill", LLAMA_VSCODE_INFILL),
    Capture("completion", "chat", "POST", "/completion",
            {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0, "stop": ["\n"]}),
    Capture("completion_stream", "chat", "POST", "/completion",
            {"prompt": "The capital of France is", "n_predict": 4, "temperature": 0, "stream": True}),
    Capture("completion_response_fields", "chat", "POST", "/completion",
            {"prompt": "The capital of France is", "n_predict": 4, "temperature": 0,
             "response_fields": LLAMA_VSCODE_INFILL["response_fields"]}),
    Capture("tokenize", "chat", "POST", "/tokenize", {"content": "hello world"}),
    Capture("tokenize_pieces", "chat", "POST", "/tokenize", {"content": "hello world", "with_pieces": True}),
    Capture("tokenize_add_special", "chat", "POST", "/tokenize", {"content": "hello world", "add_special": True}),
    Capture("detokenize", "chat", "POST", "/detokenize", {"tokens": [23391, 1902]}),
    Capture("apply_template", "chat", "POST", "/apply-template",
            {"messages": [{"role": "system", "content": SYSTEM}, *MESSAGES]}),
    Capture("chat_input_tokens", "chat", "POST", "/chat/completions/input_tokens",
            {"model": "gemma-3-270m", "messages": [{"role": "system", "content": SYSTEM}, *MESSAGES]}),
    Capture("v1_chat_input_tokens", "chat", "POST", "/v1/chat/completions/input_tokens",
            {"model": "gemma-3-270m", "messages": [{"role": "system", "content": SYSTEM}, *MESSAGES]}),
    Capture("models", "chat", "GET", "/models"),
    # reranking: refused by a server without --reranking, answered by one with it
    Capture("err_rerank_not_enabled", "chat", "POST", "/v1/rerank", RERANK),
    Capture("err_rerank_alias_not_enabled", "chat", "POST", "/rerank", RERANK),
    Capture("rerank", "rerank", "POST", "/v1/rerank", RERANK),
    Capture("rerank_alias", "rerank", "POST", "/rerank", RERANK),
    Capture("v1_reranking", "rerank", "POST", "/v1/reranking", {**RERANK, "top_n": 2}),
    Capture("rerank_tei", "rerank", "POST", "/rerank",
            {"query": RERANK["query"], "texts": RERANK["documents"], "return_text": True}),
    Capture("err_rerank_missing_query", "rerank", "POST", "/v1/rerank", {"documents": ["a"]}),
    Capture("err_rerank_no_documents", "rerank", "POST", "/v1/rerank", {"query": "a", "documents": []}),
]


def exchange(base: str, method: str, path: str, body: Any = None,
             timeout: float = 300) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """(status, reason, headers in order, body bytes as received, chunked framing removed)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.reason, resp.getheaders(), resp.read()
    finally:
        conn.close()


def render(capture: Capture, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> str:
    sent = capture.body.decode() if isinstance(capture.body, bytes) else json.dumps(capture.body)
    lines = [f"### {capture.method} {capture.path}"]
    if capture.body is not None:
        lines.append(f"> {sent}")
    lines.append(f"HTTP/1.1 {status} {reason}")
    lines += [f"{k}: {v}" for k, v in headers]
    return "\n".join(lines) + "\n\n" + body.decode(errors="replace")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat", required=True, help="URL of a llama-server started with --jinja")
    parser.add_argument("--rerank", help="URL of a llama-server started with --reranking")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("names", nargs="*", help="only these captures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for capture in CAPTURES:
        if args.names and capture.name not in args.names:
            continue
        base = args.chat if capture.server == "chat" else args.rerank
        if base is None:
            print(f"skip {capture.name}: no --rerank server", file=sys.stderr)
            continue
        status, reason, headers, body = exchange(base, capture.method, capture.path, capture.body)
        (args.out / f"{capture.name}.http.txt").write_text(render(capture, status, reason, headers, body))
        print(f"{status} {capture.method} {capture.path} -> {capture.name}.http.txt ({len(body)} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
