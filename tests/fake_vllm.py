"""A fake vLLM 0.32 OpenAI-compatible server: same command line, routes, bodies, SSE framing, errors
and /metrics names as the real one (captured in reference/observed/vllm-0.32-cpu/), with the
deterministic model of _fake_common.

    python tests/fake_vllm.py [serve] MODEL --host 127.0.0.1 --port 8000 [--served-model-name A B]
        [--max-num-seqs 256] [--max-model-len 4096] [--runner generate|pooling]
        [--kv-cache-memory-bytes 512M] [--block-size 16] [--enable-prompt-tokens-details]
        [--enable-auto-tool-choice --tool-call-parser hermes] [--api-key KEY] [--fake-reranker]
        [--load-delay-s 0.2] [--token-delay-ms 0] [--exit-after-s F] [--fail-health]
        [--fake-embedding-dim 384] [--fake-wire native|openai|chaos|no-usage] [--fake-controls JSON]

Put MODEL first (or use --model): a bare word after an unknown flag is read as that flag's value.
Behaviour worth knowing (all from the real one):

* Nothing listens until the engine is up (--load-delay-s): connections are refused, not 503'd.
* The generate runner serves chat/completions, Anthropic /v1/messages (+count_tokens) and
  /v1/responses; the pooling runner embeddings, and /rerank, /v1/rerank, /v2/rerank when its model
  is a cross-encoder (``--fake-reranker``, or ``--task score`` / ``--convert classify``); the other
  routes are 404 ``{"detail":"Not Found"}``. /tokenize and /detokenize are always there. (Not
  faked: /pooling, /score, /classify, /v1/responses/{id}; vLLM has no /infill, /completion,
  /apply-template nor input_tokens routes.) The new routes' shapes come from vLLM 0.32's own
  pydantic models (data/vllm-0.32-models/routes.json, tests/vllm_model_shapes.py), not from a
  capture of a running server.
* Streams send usage only when ``stream_options.include_usage`` is true; the last token chunk
  carries finish_reason (no separate finish chunk). ``stream_options`` without ``stream`` is a 400.
* usage.prompt_tokens_details is null unless --enable-prompt-tokens-details; cached tokens are
  then the prompt-cache hit rounded down to whole --block-size blocks.
* The KV cache holds ``--kv-cache-memory-bytes / 20480`` tokens (16 * max-model-len without it);
  ``vllm:kv_cache_usage_perc`` is the live share of it used by running requests.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections import Counter
from http import HTTPStatus
from typing import Any

import msgspec
from _fake_common import (
    DEFAULT_MAX_TOKENS,
    FAKE_DEFAULTS,
    FAKE_FLAGS,
    Controls,
    FakeServer,
    Flag,
    Job,
    Named,
    Output,
    Renderer,
    RequestError,
    anthropic_chat_messages,
    chat_prompt,
    completion_prompt,
    detokenize,
    early_sigterm,
    embedding,
    embedding_base64,
    embedding_inputs,
    parse_cli,
    plan_output,
    prometheus_float,
    rerank_score,
    responses_chat_messages,
    run,
    token_id,
)
from aiohttp import web

VERSION = "0.32.0"
SYSTEM_FINGERPRINT = f"vllm-{VERSION}-25f8512e"
KV_BYTES_PER_TOKEN = 20480  # ~ what the capture shows for Gemma 3 270M (512 MiB -> 26372 tokens)


def human_int(text: str) -> int:
    """vLLM's human-readable sizes: 512M, 1G (binary), 32k (decimal)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?", text.strip())
    if not match:
        raise ValueError(text)
    number, unit = float(match.group(1)), match.group(2)
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    return int(number * (1024 if unit.isupper() else 1000) ** power)


FLAGS: dict[str, Flag] = {
    **FAKE_FLAGS,
    "--host": Flag("host"),
    "--port": Flag("port", convert=int),
    "--model": Flag("model"),
    "--served-model-name": Flag("served_model_name", "list"),
    "--max-num-seqs": Flag("max_num_seqs", convert=int),
    "--max-model-len": Flag("max_model_len", convert=human_int),
    "--tensor-parallel-size": Flag("tensor_parallel_size", convert=int),
    "-tp": Flag("tensor_parallel_size", convert=int),
    "--runner": Flag("runner"),
    "--task": Flag("task"),
    "--convert": Flag("convert"),
    "--kv-cache-memory-bytes": Flag("kv_cache_memory_bytes", convert=human_int),
    "--block-size": Flag("block_size", convert=int),
    "--enable-prompt-tokens-details": Flag("prompt_tokens_details", "switch"),
    "--enable-auto-tool-choice": Flag("auto_tool_choice", "switch"),
    "--tool-call-parser": Flag("tool_call_parser"),
    "--api-key": Flag("api_key"),
    "--fake-reranker": Flag("reranker", "switch"),  # the pooling model is a cross-encoder (scores pairs)
}

DEFAULTS: dict[str, Any] = {
    **FAKE_DEFAULTS,
    "host": "127.0.0.1",  # the real default is all interfaces; a test double stays on loopback
    "port": 8000,
    "model": None,
    "served_model_name": None,
    "max_num_seqs": 256,
    "max_model_len": 4096,
    "tensor_parallel_size": 1,
    "runner": "auto",
    "task": None,
    "convert": None,
    "kv_cache_memory_bytes": None,
    "block_size": 16,
    "prompt_tokens_details": False,
    "auto_tool_choice": False,
    "tool_call_parser": None,
    "api_key": None,
    "reranker": False,
    "embedding_dim": 384,  # all-MiniLM-L6-v2, the captured pooling model
}

# The pooling runner's answer to a body without "input": pydantic tries every request type of the
# endpoint's union, hence seven errors (verbatim from the capture but for the item count).
MISSING_INPUT = "\n".join(
    ["7 validation errors:"]
    + [f"  {{'type': 'missing', 'loc': 'body.{loc}', 'msg': 'Field required', 'input': '<dict of {{n}} items>'}}"
       for loc in ("input", "messages", "messages", "messages", "input", "messages", "input")]
)


def hex_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def error_type_for(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return phrase if phrase.endswith("Error") else phrase + "Error"


def validation_error(loc: str, kind: str, msg: str, body: dict[str, Any]) -> RequestError:
    message = (f"1 validation error:\n  {{'type': '{kind}', 'loc': 'body.{loc}', 'msg': '{msg}', "
               f"'input': '<dict of {len(body)} items>'}}")
    return RequestError(400, message, error_type="Bad Request", extra={"param": f"body.{loc}"})


class VllmRenderer(Renderer):
    done_after_error = True
    content_type = "text/event-stream; charset=utf-8"
    chunk_object: str
    id: str

    def __init__(self, server: VllmServer, job: Job, output: Output, model: str,
                 include_usage: bool) -> None:
        super().__init__(job, output)
        self.server = server
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def usage(self, *, stream: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.job.prompt_tokens,
                                 "total_tokens": self.job.prompt_tokens + self.job.decoded,
                                 "completion_tokens": self.job.decoded}
        details = {"cached_tokens": self.job.cached} if self.server.opts["prompt_tokens_details"] else None
        if not stream:
            usage |= {"prompt_tokens_details": details, "completion_tokens_details": None}
        elif details:
            usage["prompt_tokens_details"] = details
        return usage

    def tail(self) -> list[Any]:
        if not self.include_usage:
            return []
        return [{"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [], "usage": self.usage(stream=True), "system_fingerprint": SYSTEM_FINGERPRINT}]

    def stream_error(self, message: str) -> Any:
        return {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}


class ChatRenderer(VllmRenderer):
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = hex_id("chatcmpl-")

    def head(self) -> list[Any]:
        return [{"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}],
                 "prompt_token_ids": None, "prompt_text": None}]

    def chunk(self, i: int) -> Any:
        choice: dict[str, Any] = {"index": 0, "delta": self.output.delta(i), "logprobs": None,
                                  "finish_reason": None, "token_ids": None}
        if i == self.output.n_tokens - 1:
            choice |= {"finish_reason": self.output.finish_reason, "stop_reason": None}
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [choice]}

    def final(self) -> Any:
        call = self.output.tool_call
        message: dict[str, Any] = {"role": "assistant", "content": None if call else self.output.text,
                                   "refusal": None, "annotations": None, "audio": None, "function_call": None}
        if call:
            message["tool_calls"] = self.output.tool_calls()
        message["reasoning"] = None
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self.output.finish_reason, "stop_reason": None, "token_ids": None,
                         "routed_experts": None}],
            "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": self.usage(stream=False),
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }


class CompletionRenderer(VllmRenderer):
    chunk_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = hex_id("cmpl-")

    def chunk(self, i: int) -> Any:
        last = i == self.output.n_tokens - 1
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": self.output.pieces[i], "logprobs": None,
                             "finish_reason": self.output.finish_reason if last else None,
                             "stop_reason": None, "token_ids": None}]}

    def final(self) -> Any:
        return {
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "text": self.output.text, "logprobs": None,
                         "finish_reason": self.output.finish_reason, "stop_reason": None, "token_ids": None,
                         "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": self.usage(stream=False),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }


# Anthropic's stop_reason for the fake's finish reasons (vLLM's _to_anthropic_stop_reason)
ANTHROPIC_STOP = {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use"}


class AnthropicRenderer(VllmRenderer):
    """/v1/messages, as vLLM converts a chat answer: the whole message without its None fields
    (no stop_sequence), the stream as named events (no [DONE]); usage.input_tokens leaves out
    cache_read_input_tokens, which is only there with --enable-prompt-tokens-details."""

    done_marker = None

    def __init__(self, server: VllmServer, job: Job, output: Output, model: str) -> None:
        super().__init__(server, job, output, model, include_usage=True)
        self.id = hex_id("chatcmpl-")

    def anthropic_usage(self, output_tokens: int) -> dict[str, Any]:
        usage = {"input_tokens": self.job.prompt_tokens, "output_tokens": output_tokens}
        if self.server.opts["prompt_tokens_details"]:
            usage = {"input_tokens": self.job.prompt_tokens - self.job.cached, "output_tokens": output_tokens,
                     "cache_read_input_tokens": self.job.cached}
        return usage

    def head(self) -> list[Any]:
        events = [Named("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None, "usage": self.anthropic_usage(0)}})]
        if self.output.tool_call is None and self.output.n_tokens:
            events.append(Named("content_block_start", {"type": "content_block_start",
                                                        "content_block": {"type": "text", "text": ""}, "index": 0}))
        return events

    def chunk(self, i: int) -> Any:
        call = self.output.tool_call
        if call is None:
            delta: dict[str, Any] = {"type": "text_delta", "text": self.output.pieces[i]}
        elif i == 0:
            return Named("content_block_start", {"type": "content_block_start", "content_block": {
                "type": "tool_use", "id": call.id, "name": call.name, "input": {}}, "index": 0})
        else:
            delta = {"type": "input_json_delta", "partial_json": self.output.pieces[i - 1]}
        return Named("content_block_delta", {"type": "content_block_delta", "delta": delta, "index": 0})

    def tail(self) -> list[Any]:
        events = []
        if self.output.n_tokens:
            events.append(Named("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events += [
            Named("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": ANTHROPIC_STOP[self.output.finish_reason],
                                              "stop_sequence": None},
                                    "usage": self.anthropic_usage(self.job.decoded)}),
            Named("message_stop", {"type": "message_stop"}),
        ]
        return events

    def final(self) -> Any:
        call = self.output.tool_call
        if call is not None:
            content = [{"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}]
        else:
            # an empty answer is one empty text block, not [] (strict clients read content[0])
            content = [{"type": "text", "text": self.output.text}]
        return {"id": self.id, "type": "message", "role": "assistant", "content": content, "model": self.model,
                "stop_reason": ANTHROPIC_STOP[self.output.finish_reason],
                "usage": self.anthropic_usage(self.job.decoded)}

    def stream_error(self, message: str) -> Any:
        return Named("error", {"type": "error", "error": {"type": "internal_error", "message": message}})


class ResponsesRenderer(VllmRenderer):
    """/v1/responses (a model without a reasoning or tool parser: one output message): vLLM's
    ResponsesResponse with every field, null or not; a run to max_output_tokens is "incomplete".
    The stream's events carry sequence_number, output_index and content_index; the created,
    in_progress and completed events carry the whole response. Key sets from vLLM 0.32's own
    pydantic models (not captured from a running server)."""

    done_marker = None

    def __init__(self, server: VllmServer, job: Job, output: Output, model: str, body: dict[str, Any]) -> None:
        super().__init__(server, job, output, model, include_usage=True)
        self.body = body
        self.id = hex_id("resp_")
        self.message_id = hex_id("msg_")
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> Named:
        self.sequence += 1
        return Named(kind, {**fields, "sequence_number": self.sequence - 1, "type": kind})

    def _part(self, text: str, logprobs: list[Any] | None) -> dict[str, Any]:
        return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}

    def _message(self, status: str) -> dict[str, Any]:
        content = [self._part(self.output.text, None)] if self.output.text and status == "completed" else []
        return {"id": self.message_id, "content": content, "role": "assistant", "status": status, "type": "message",
                "phase": None}

    def response(self, status: str) -> dict[str, Any]:
        body = self.body
        done = status != "in_progress"
        if done and self.output.finish_reason == "length":
            status = "incomplete"
        usage = None
        if done:
            usage = {"input_tokens": self.job.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": self.job.cached, "cache_write_tokens": 0,
                                              "input_tokens_per_turn": [self.job.prompt_tokens],
                                              "cached_tokens_per_turn": [self.job.cached]},
                     "output_tokens": self.job.decoded,
                     "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                               "output_tokens_per_turn": [self.job.decoded],
                                               "tool_output_tokens_per_turn": [0]},
                     "total_tokens": self.job.prompt_tokens + self.job.decoded}
        return {
            "id": self.id, "created_at": self.created,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata"), "model": self.model,
            "object": "response", "output": [self._message("completed")] if done else [],
            "parallel_tool_calls": True, "temperature": float(body.get("temperature", 1.0)),
            "tool_choice": body.get("tool_choice", "auto" if body.get("tools") else "none"),
            "tools": body.get("tools") or [], "top_p": float(body.get("top_p", 1.0)), "background": False,
            "max_output_tokens": self.job.n_predict, "max_tool_calls": None, "previous_response_id": None,
            "prompt": None, "reasoning": None, "service_tier": "auto", "status": status, "text": None,
            "top_logprobs": None, "truncation": "disabled", "usage": usage, "user": None,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": None,
            "ec_transfer_params": None, "input_messages": None, "output_messages": None,
        }

    def head(self) -> list[Any]:
        pending = self.response("in_progress")
        events = [self._event("response.created", response=pending),
                  self._event("response.in_progress", response=pending)]
        if self.output.n_tokens:
            events += [self._event("response.output_item.added", item=self._message("in_progress"), output_index=0),
                       self._event("response.content_part.added", content_index=0, item_id=self.message_id,
                                   output_index=0, part=self._part("", []))]
        return events

    def chunk(self, i: int) -> Any:
        return self._event("response.output_text.delta", content_index=0, delta=self.output.pieces[i],
                           item_id=self.message_id, logprobs=[], output_index=0)

    def tail(self) -> list[Any]:
        events = []
        if self.output.n_tokens:
            events += [
                self._event("response.output_text.done", content_index=0, item_id=self.message_id, logprobs=[],
                            output_index=0, text=self.output.text),
                self._event("response.content_part.done", content_index=0, item_id=self.message_id,
                            output_index=0, part=self._part(self.output.text, None)),
                self._event("response.output_item.done", item=self._message("completed"), output_index=0),
            ]
        events.append(self._event("response.completed", response=self.response("completed")))
        return events

    def final(self) -> Any:
        return self.response("completed")

    def stream_error(self, message: str) -> Any:
        # OpenAI's ResponseErrorEvent, which vLLM sends for a generation error
        return self._event("error", code="internal_error", message=message, param=None)


# Set on a request whose handler errors vLLM renders in Anthropic's envelope (/v1/messages)
ANTHROPIC_ERRORS = web.RequestKey("fake_anthropic_errors", bool)


def anthropic_error(error: web.Response) -> web.Response:
    """vLLM's translate_error_response: an error the Messages handler returns, re-enveloped as
    {"type": "error", "error": {"type", "message"}} with the same status."""
    doc = json.loads(error.body) if isinstance(error.body, bytes) else {}
    inner = doc.get("error") or {}
    body = {"type": "error", "error": {"type": inner.get("type", error_type_for(error.status)),
                                       "message": inner.get("message", "")}}
    headers = {k: v for k, v in error.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.json_response(body, status=error.status, headers=headers)


class VllmServer(FakeServer):
    name = "vllm"
    server_header = "uvicorn"
    listen_while_loading = False

    def __init__(self, opts: dict[str, Any]) -> None:
        super().__init__(opts, opts["max_num_seqs"])
        self.model_path: str = opts["model"] or "facebook/opt-125m"  # vLLM's own default model
        self.served: list[str] = opts["served_model_name"] or [self.model_path]
        self.max_model_len: int = opts["max_model_len"]
        runner = opts["runner"]
        if runner == "auto":
            pooling = opts["task"] in ("embed", "embedding", "classify", "score") or opts["convert"] == "embed"
            runner = "pooling" if pooling else "generate"
        self.runner: str = runner
        kv_bytes = opts["kv_cache_memory_bytes"]
        self.kv_tokens = kv_bytes // KV_BYTES_PER_TOKEN if kv_bytes else 16 * self.max_model_len
        self.created = int(time.time())
        self.t_created = time.time()
        self.counts: Counter[str] = Counter()
        self.histograms: dict[str, list[float]] = {}  # name -> [count, sum]
        add = self.app.router
        add.add_get("/health", self.health)
        add.add_get("/ping", self.ping)
        add.add_post("/ping", self.ping)
        add.add_get("/version", self.version)
        add.add_get("/load", self.load)
        add.add_get("/metrics", self.metrics)
        add.add_get("/v1/models", self.models)
        add.add_post("/tokenize", self.tokenize)
        add.add_post("/detokenize", self.helper(self.detokenize))
        if self.runner == "pooling":
            add.add_post("/v1/embeddings", self.inference(self.embeddings))
            if opts["reranker"] or opts["task"] == "score" or opts["convert"] == "classify":
                # a cross-encoder: Jina/Cohere-style rerank (and vLLM's own /score, not faked)
                for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
                    add.add_post(path, self.inference(self.rerank))
        else:
            add.add_post("/v1/chat/completions", self.inference(self.chat))
            add.add_post("/v1/completions", self.inference(self.completions))
            add.add_post("/v1/messages", self.inference(self.messages))
            add.add_post("/v1/messages/count_tokens", self.helper(self.messages_count_tokens))
            add.add_post("/v1/responses", self.inference(self.responses))

    # ---- envelopes ----

    def error_response(self, status: int, message: str, *, error_type: str | None = None,
                       headers: dict[str, str] | None = None,
                       extra: dict[str, Any] | None = None) -> web.Response:
        error = {"message": message, "type": error_type or error_type_for(status), "param": None,
                 "code": status, **(extra or {})}
        return self.json({"error": error}, status, headers)

    def not_found(self) -> web.Response:
        return self.json({"detail": "Not Found"}, 404)

    def control_error(self, ctl: Controls, request: web.Request) -> web.Response:
        error = super().control_error(ctl, request)
        return anthropic_error(error) if request.get(ANTHROPIC_ERRORS) and ctl.body is None else error

    def method_not_allowed(self) -> web.Response:
        return self.json({"detail": "Method Not Allowed"}, 405)

    def malformed_json(self, exc: Any, raw: bytes) -> web.Response:
        message = (f"1 validation error:\n  {{'type': 'json_invalid', 'loc': 'body.{exc.pos}', "
                   f"'msg': 'JSON decode error', 'input': '<dict of 0 items>', "
                   f"'ctx': {{'error': '{exc.msg}'}}}}")
        return self.error_response(400, message, error_type="Bad Request", extra={"param": f"body.{exc.pos}"})

    def log_listening(self) -> None:
        log_vllm(f"Starting vLLM API server 0 on http://{self.host}:{self.port}")
        for line in (f"Started server process [{os.getpid()}]", "Waiting for application startup.",
                     "Application startup complete."):
            print(f"INFO:     {line}", file=sys.stderr, flush=True)

    # ---- read-only routes ----

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.opts["fail_health"] else 200)

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.opts["fail_health"] else 200)

    async def version(self, request: web.Request) -> web.Response:
        return self.json({"version": VERSION})

    async def load(self, request: web.Request) -> web.Response:
        return self.json({"server_load": self.stats.in_flight})

    async def models(self, request: web.Request) -> web.Response:
        if denied := self.check_api_key(request):
            return denied
        return self.json({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
             "root": self.model_path, "parent": None, "max_model_len": self.max_model_len,
             "permission": [{"id": hex_id("modelperm-"), "object": "model_permission",
                             "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                             "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                             "allow_fine_tuning": False, "organization": "*", "group": None,
                             "is_blocking": False}]}
            for name in self.served]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        if isinstance(body, web.Response):
            return body
        body = body if isinstance(body, dict) else {}
        if "messages" in body:
            words = chat_prompt(body["messages"] if isinstance(body["messages"], list) else [])
        else:
            words = completion_prompt(body.get("prompt", ""))
        return self.json({"count": len(words), "max_model_len": self.max_model_len,
                          "tokens": [token_id(w) for w in words], "token_strs": None})

    async def detokenize(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        if not isinstance(body.get("tokens"), list):
            raise validation_error("tokens", "missing", "Field required", body)
        return self.json({"prompt": detokenize(body["tokens"])})

    # ---- metrics ----

    def count_prompt(self, job: Job) -> None:
        # vLLM caches whole blocks only, so the hit is rounded down to a block boundary
        job.cached -= job.cached % self.opts["block_size"]
        self.counts["prefix_cache_queries"] += job.prompt_tokens
        self.counts["prefix_cache_hits"] += job.cached
        self.counts["prompt_tokens"] += job.prompt_tokens
        self.counts["prompt_tokens_cached"] += job.cached

    def count_token(self, job: Job) -> None:
        super().count_token(job)
        self.counts["generation_tokens"] += 1

    def count_finished(self, job: Job, finish_reason: str) -> None:
        super().count_finished(job, finish_reason)
        self.counts[f"request_success:{finish_reason}"] += 1
        end = job.t_end or time.monotonic()
        self.observe("e2e_request_latency_seconds", end - job.t_arrived)
        if job.t_first_token:
            self.observe("time_to_first_token_seconds", job.t_first_token - job.t_arrived)
        self.observe("request_prompt_tokens", job.prompt_tokens)
        self.observe("request_generation_tokens", job.decoded)

    def observe(self, name: str, value: float) -> None:
        count_sum = self.histograms.setdefault(name, [0, 0.0])
        count_sum[0] += 1
        count_sum[1] += value

    async def metrics(self, request: web.Request) -> web.Response:
        model = self.served[0]
        base = f'engine="0",model_name="{model}"'
        running = self.slots.running.values()
        kv_used = sum(job.prompt_tokens + job.decoded for job in running)
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, str, float]]) -> None:
            lines.extend((f"# HELP vllm:{name} {help_text}", f"# TYPE vllm:{name} {kind}"))
            lines.extend(f"vllm:{name}{suffix}{{{labels}}} {prometheus_float(value)}"
                         for suffix, labels, value in samples)

        def counter(name: str, help_text: str, value: float) -> None:
            family(f"{name}_total", "counter", help_text, [("", base, value)])
            family(f"{name}_created", "gauge", help_text, [("", base, self.t_created)])

        family("num_requests_running", "gauge", "Number of requests in model execution batches.",
               [("", base, len(self.slots.running))])
        family("num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               [("", base, self.slots.waiting)])
        family("num_requests_waiting_by_reason", "gauge", "Number of requests waiting, by reason.",
               [("", f'{base},reason="capacity"', self.slots.waiting), ("", f'{base},reason="deferred"', 0)])
        family("engine_sleep_state", "gauge", "Engine sleep state.",
               [("", f'{base},sleep_state="{state}"', float(state == "awake"))
                for state in ("awake", "weights_offloaded", "discard_all")])
        family("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               [("", base, min(kv_used / self.kv_tokens, 1.0))])
        counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                self.counts["prefix_cache_queries"])
        counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                self.counts["prefix_cache_hits"])
        counter("num_preemptions", "Cumulative number of preemption from the engine.", 0)
        counter("prompt_tokens", "Number of prefill tokens processed.", self.counts["prompt_tokens"])
        counter("prompt_tokens_cached", "Number of cached prompt tokens.", self.counts["prompt_tokens_cached"])
        counter("generation_tokens", "Number of generation tokens processed.", self.counts["generation_tokens"])
        reasons = ("stop", "length", "abort", "error", "repetition")
        help_text = "Count of successfully processed requests."
        family("request_success_total", "counter", help_text,
               [("", f'engine="0",finished_reason="{r}",model_name="{model}"', self.counts[f"request_success:{r}"])
                for r in reasons])
        family("request_success_created", "gauge", help_text,
               [("", f'engine="0",finished_reason="{r}",model_name="{model}"', self.t_created) for r in reasons])
        for name in ("request_prompt_tokens", "request_generation_tokens", "time_to_first_token_seconds",
                     "e2e_request_latency_seconds"):
            count, total = self.histograms.get(name, [0, 0.0])
            family(name, "histogram", f"Histogram of {name.replace('_', ' ')}.",
                   [("_bucket", f'{base},le="+Inf"', count), ("_count", base, count), ("_sum", base, total)])
            family(f"{name}_created", "gauge", f"Histogram of {name.replace('_', ' ')}.",
                   [("", base, self.t_created)])
        info = {"block_size": self.opts["block_size"], "cache_dtype": "auto", "enable_prefix_caching": "True",
                "engine": "0", "kv_cache_memory_bytes": self.opts["kv_cache_memory_bytes"],
                "kv_cache_size_tokens": self.kv_tokens}
        family("cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
               [("", ",".join(f'{k}="{v}"' for k, v in info.items()), 1.0)])
        return web.Response(body=("\n".join(lines) + "\n").encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ---- requests ----

    def check_api_key(self, request: web.Request) -> web.Response | None:
        key = self.opts["api_key"] or os.environ.get("VLLM_API_KEY")
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            return self.json({"error": "Unauthorized"}, 401)
        return None

    def resolve_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            return self.served[0]
        if model not in self.served:
            if self.runner == "pooling":
                raise RequestError(404, f"The model `{model}` does not exist.", error_type="NotFoundError")
            raise RequestError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(self.served)}.",
                               error_type="NotFoundError", extra={"param": "model"})
        return model

    def new_job(self, prompt: list[str], body: dict[str, Any]) -> Job:
        limit = self.max_model_len
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(requested, int) and requested > limit:
            raise RequestError(
                400, f"max_tokens={requested} cannot be greater than max_model_len={limit}. Please request "
                     f"fewer output tokens. (parameter=max_tokens, value={requested})",
                error_type="BadRequestError", extra={"param": "max_tokens"})
        if len(prompt) >= limit:
            # not captured; shaped like the max_tokens error above
            raise RequestError(
                400, f"This model's maximum context length is {limit} tokens. However, your request has "
                     f"{len(prompt)} input tokens. Please reduce the length of the input messages. "
                     f"(parameter=input_tokens, value={len(prompt)})",
                error_type="BadRequestError", extra={"param": "input_tokens"})
        if isinstance(requested, int) and len(prompt) + requested > limit:
            raise RequestError(
                400, f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's maximum "
                     f"context length is {limit} tokens and your request has {len(prompt)} input tokens "
                     f"({requested} > {limit} - {len(prompt)}). (parameter=max_tokens, value={requested})",
                error_type="BadRequestError", extra={"param": "max_tokens"})
        # the real default is the rest of the context; tests want short answers
        default = min(DEFAULT_MAX_TOKENS, limit - len(prompt))
        n = requested if isinstance(requested, int) and requested >= 0 else default
        return Job(self.next_task_id(), prompt, n_predict=n)

    def stream_flags(self, body: dict[str, Any]) -> tuple[bool, bool]:
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        if options and not stream:
            raise RequestError(400, "Stream options can only be defined when `stream=True`.",
                               error_type="BadRequestError")
        return stream, isinstance(options, dict) and bool(options.get("include_usage"))

    async def chat(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        if denied := self.check_api_key(request):
            return denied
        if "messages" not in body:
            raise validation_error("messages", "missing", "Field required", body)
        if not isinstance(body["messages"], list):
            raise validation_error("messages", "list_type", "Input should be a valid list", body)
        stream, include_usage = self.stream_flags(body)
        model = self.resolve_model(body)
        tools = body.get("tools")
        tool_choice = body.get("tool_choice", "auto" if tools else "none")
        if tools and tool_choice == "auto" and not (self.opts["auto_tool_choice"] and self.opts["tool_call_parser"]):
            raise RequestError(400, '"auto" tool choice requires --enable-auto-tool-choice and '
                                    "--tool-call-parser to be set", error_type="BadRequestError")
        job = self.new_job(chat_prompt(body["messages"]), body)
        output = plan_output(body, ctl, job.n_predict, hex_id("chatcmpl-tool-"))
        renderer = ChatRenderer(self, job, output, model, include_usage)
        return await self.generate(request, ctl, job, renderer, stream)

    async def completions(self, request: web.Request, body: dict[str, Any],
                          ctl: Controls) -> web.StreamResponse:
        if denied := self.check_api_key(request):
            return denied
        if "prompt" not in body:
            raise validation_error("prompt", "missing", "Field required", body)
        stream, include_usage = self.stream_flags(body)
        model = self.resolve_model(body)
        job = self.new_job(completion_prompt(body["prompt"]), body)
        # a completion has no tool calls; the control's other effects still apply
        output = plan_output(body, msgspec.structs.replace(ctl, tool_call=False), job.n_predict, "")
        renderer = CompletionRenderer(self, job, output, model, include_usage)
        return await self.generate(request, ctl, job, renderer, stream)

    @staticmethod
    def require(body: dict[str, Any], *fields: tuple[str, type]) -> None:
        """pydantic's first complaint about a missing or mistyped required field (the real one
        lists them all, "N validation errors")."""
        for name, kind in fields:
            if name not in body:
                raise validation_error(name, "missing", "Field required", body)
            if kind is list and not isinstance(body[name], list):
                raise validation_error(name, "list_type", "Input should be a valid list", body)
            if kind is int and (not isinstance(body[name], int) or isinstance(body[name], bool)):
                raise validation_error(name, "int_type", "Input should be a valid integer", body)

    async def messages(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """POST /v1/messages: model, messages and max_tokens are required (pydantic, 400)."""
        if denied := self.check_api_key(request):
            return denied
        # pydantic's errors come before the handler (OpenAI's envelope); the handler's own, and a
        # status control, are re-enveloped the Anthropic way
        self.require(body, ("model", str), ("messages", list), ("max_tokens", int))
        request[ANTHROPIC_ERRORS] = True
        try:
            model = self.resolve_model(body)
            job = self.new_job(chat_prompt(anthropic_chat_messages(body)), {"max_tokens": body["max_tokens"]})
        except RequestError as exc:
            return anthropic_error(self.error_response(exc.status, exc.message, error_type=exc.error_type))
        tools = [{"type": "function", "function": {"name": t.get("name", ""),
                                                   "parameters": t.get("input_schema") or {}}}
                 for t in body.get("tools") or () if isinstance(t, dict)]
        output = plan_output({"tools": tools}, ctl, job.n_predict, hex_id("chatcmpl-tool-"))
        renderer = AnthropicRenderer(self, job, output, model)
        return await self.generate(request, ctl, job, renderer, bool(body.get("stream")))

    async def messages_count_tokens(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self.require(body, ("model", str), ("messages", list))
        n = len(chat_prompt(anthropic_chat_messages(body)))
        return self.json({"input_tokens": n, "context_management": {"original_input_tokens": n}})

    async def responses(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """POST /v1/responses: ``input`` is required; text answers only (no tool parser)."""
        if denied := self.check_api_key(request):
            return denied
        self.require(body, ("input", object))
        model = self.resolve_model(body)
        job = self.new_job(chat_prompt(responses_chat_messages(body)), {"max_tokens": body.get("max_output_tokens")})
        output = plan_output(body, msgspec.structs.replace(ctl, tool_call=False), job.n_predict, "")
        renderer = ResponsesRenderer(self, job, output, model, body)
        return await self.generate(request, ctl, job, renderer, bool(body.get("stream")))

    async def rerank(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """/rerank, /v1/rerank, /v2/rerank with a cross-encoder: results sorted by
        relevance_score, each with its document; top_n 0 (the default) is all."""
        if denied := self.check_api_key(request):
            return denied
        self.require(body, ("query", str), ("documents", object))
        model = self.resolve_model(body)
        query = str(body["query"])
        documents = body["documents"] if isinstance(body["documents"], list) else [body["documents"]]
        documents = [str(d) for d in documents]
        top_n = body.get("top_n", 0) if isinstance(body.get("top_n", 0), int) else 0
        words = [w for d in documents for w in query.split() + d.split()]
        job = Job(self.next_task_id(), words)

        def build() -> dict[str, Any]:
            results = sorted(({"index": i, "document": {"text": d, "multi_modal": None},
                               "relevance_score": rerank_score(query, d)} for i, d in enumerate(documents)),
                             key=lambda r: -r["relevance_score"])
            if 0 < top_n < len(documents):
                results = results[:top_n]
            return {"id": hex_id("score-"), "model": model,
                    "usage": {"prompt_tokens": len(words), "total_tokens": len(words)}, "results": results}

        return await self.answer(request, ctl, job, build)

    async def embeddings(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        if denied := self.check_api_key(request):
            return denied
        if "input" not in body:
            raise RequestError(400, MISSING_INPUT.replace("{n}", str(len(body))), error_type="Bad Request",
                               extra={"param": "body.input"})
        model = self.resolve_model(body)
        texts = embedding_inputs(body["input"])
        for text in texts:
            if len(text.split()) > self.max_model_len:
                raise RequestError(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                         f"requested {len(text.split())} tokens in the input for embedding generation. Please "
                         "reduce the length of the input.", error_type="BadRequestError")
        fmt = body.get("encoding_format", "float")
        dim = self.opts["embedding_dim"]
        job = Job(self.next_task_id(), [w for text in texts for w in text.split()])

        def build() -> dict[str, Any]:
            data = []
            for i, text in enumerate(texts):
                vector = embedding(text, dim)
                data.append({"index": i, "object": "embedding",
                             "embedding": embedding_base64(vector) if fmt == "base64" else vector})
            n = job.prompt_tokens
            return {"id": hex_id("embd-"), "object": "list", "created": int(time.time()), "model": model,
                    "data": data, "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                                            "prompt_tokens_details": None, "completion_tokens_details": None}}

        return await self.answer(request, ctl, job, build)


def log_vllm(message: str) -> None:
    # vLLM's logger writes to stdout; uvicorn's to stderr
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"(APIServer pid={os.getpid()}) INFO {stamp} [api_server.py:1] {message}", flush=True)


def main(argv: list[str]) -> None:
    early_sigterm()
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    opts, positionals = parse_cli(argv, FLAGS, DEFAULTS)
    if positionals and not opts["model"]:
        opts["model"] = positionals[0]
    log_vllm(f"vLLM API server version {VERSION}")
    run(VllmServer(opts))


if __name__ == "__main__":
    main(sys.argv[1:])
