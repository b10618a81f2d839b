"""A fake llama-server: same command line, routes, bodies, SSE framing and errors as the real one
(captured in reference/observed/llama-server/), with a deterministic model (see _fake_common).

    python tests/fake_backend.py --host 127.0.0.1 --port 8081 -m model.gguf -np 2 -c 4096 --metrics
        [--embeddings] [--pooling mean] [--reranking] [--no-fim] [--alias NAME] [--no-jinja] [-n N]
        [--no-slots] [--load-delay-s 0.2] [--token-delay-ms 0] [--exit-after-s F] [--fail-health]
        [--fake-embedding-dim 640] [--fake-wire native|openai|chaos|no-usage] [--fake-controls JSON]

Any other llama-server flag is accepted and ignored. Behaviour worth knowing (all from the real one):

* It listens at once; every route but /fake/* answers 503 "Loading model" until --load-delay-s.
* Slots: ``-np`` (default 4 like llama-server's auto), each ``-c/-np`` tokens of context; requests
  beyond the slots wait (``llamacpp:requests_deferred``).
* /v1/completions and /v1/embeddings are OpenAI-shaped; /completion(s) and /embedding(s) are
  llama.cpp's native formats, exactly as the real server routes them. /chat/completions is an alias.
* A chat stream sends usage only when ``stream_options.include_usage`` is true; otherwise the
  finish chunk carries just ``timings``. A completions stream always ends with usage + timings.
* /v1/messages (Anthropic) and /v1/responses (OpenAI) are chats with the same prompt count; their
  streams are named events without [DONE]. Anthropic's ``input_tokens`` excludes the cache hit
  (``cache_read_input_tokens``); a missing ``max_tokens`` is allowed. /v1/messages/count_tokens,
  /v1/responses/input_tokens and /(v1/)chat/completions/input_tokens count without generating.
* /infill answers like /completion (a FIM model); ``--no-fim`` gives the real 501 of a model
  without FIM tokens (Gemma 3). /completion and /infill honour ``response_fields``.
* /rerank, /reranking, /v1/rerank, /v1/reranking: 501 unless ``--reranking`` (= --embeddings
  --pooling rank); Jina's shape for ``documents``, TEI's bare list for ``texts``.
* /tokenize, /detokenize, /apply-template and the token counts are helpers: no slot, not in
  /fake/stats' ``requests``; a request's own ``"fake"`` controls still apply.
* Shapes are checked against the captures in tests/data/observed/llama-server/routes/
  (test_fake_routes.py) and against a live llama-server (test_real_routes_shapes.py).
"""

from __future__ import annotations

import json
import secrets
import string
import sys
import time
from typing import Any, ClassVar

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
    infill_prompt,
    parse_cli,
    plan_output,
    rerank_score,
    responses_chat_messages,
    run,
    token_id,
)
from aiohttp import web

BUILD_INFO = "b0-unknown"

FLAGS: dict[str, Flag] = {
    **FAKE_FLAGS,
    "--host": Flag("host"),
    "--port": Flag("port", convert=int),
    "-m": Flag("model"),
    "--model": Flag("model"),
    "-np": Flag("parallel", convert=int),
    "--parallel": Flag("parallel", convert=int),
    "-c": Flag("ctx_size", convert=int),
    "--ctx-size": Flag("ctx_size", convert=int),
    "-t": Flag("threads", convert=int),
    "--threads": Flag("threads", convert=int),
    "-n": Flag("n_predict", convert=int),
    "--predict": Flag("n_predict", convert=int),
    "--n-predict": Flag("n_predict", convert=int),
    "-a": Flag("alias"),
    "--alias": Flag("alias"),
    "--jinja": Flag("jinja", "switch"),
    "--no-jinja": Flag("jinja", "off"),
    "--metrics": Flag("metrics", "switch"),
    "--slots": Flag("slots_endpoint", "switch"),
    "--no-slots": Flag("slots_endpoint", "off"),
    "--embedding": Flag("embeddings", "switch"),
    "--embeddings": Flag("embeddings", "switch"),
    "--pooling": Flag("pooling"),
    "--rerank": Flag("reranking", "switch"),
    "--reranking": Flag("reranking", "switch"),
    "--no-fim": Flag("fim", "off"),  # the fake's own: a model without FIM tokens (like Gemma 3)
}

DEFAULTS: dict[str, Any] = {
    **FAKE_DEFAULTS,
    "host": "127.0.0.1",
    "port": 8080,
    "model": "models/fake-model.gguf",
    "parallel": -1,
    "ctx_size": 4096,
    "threads": None,
    "n_predict": -1,
    "alias": None,
    "jinja": True,  # this llama.cpp enables jinja by default
    "metrics": False,
    "slots_endpoint": True,
    "embeddings": False,
    "pooling": None,
    "reranking": False,
    "fim": True,
    "embedding_dim": 640,  # Gemma 3 270M's n_embd
}

AUTO_SLOTS = 4  # what llama-server picks for -np -1 (auto)

# Error "type" per status, as llama.cpp's format_error_response maps them.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 500: "server_error", 501: "not_supported_error",
               503: "unavailable_error"}

SAMPLING_PARAMS: dict[str, Any] = {
    "seed": 4294967295, "temperature": 0.800000011920929, "top_k": 40, "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806, "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "max_tokens": -1, "n_predict": -1, "n_keep": 0, "ignore_eos": False,
    "stream": False, "n_probs": 0, "chat_format": "Content-only", "reasoning_format": "none",
    "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
}

# /completion's generation_settings (the real one's defaults, from routes/completion.http.txt);
# the fake fills in what the request set: temperature, stop, stream, n_predict.
GENERATION_SETTINGS: dict[str, Any] = {
    "seed": 4294967295, "temperature": 0.800000011920929, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
    "top_k": 40, "top_p": 0.949999988079071, "min_p": 0.05000000074505806, "top_n_sigma": -1.0,
    "xtc_probability": 0.0, "xtc_threshold": 0.10000000149011612, "typical_p": 1.0, "repeat_last_n": 64,
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
    "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
    "dry_sequence_breakers": ["\n", ":", "\"", "*"], "mirostat": 0, "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612, "adaptive_target": -1.0, "adaptive_decay": 0.8999999761581421,
    "stop": [], "max_tokens": -1, "n_predict": -1, "n_keep": 0, "n_discard": 0, "ignore_eos": False,
    "stream": False, "logit_bias": [], "n_probs": 0, "min_keep": 0, "grammar": "", "grammar_lazy": False,
    "grammar_triggers": [], "preserved_tokens": [], "chat_format": "Content-only", "reasoning_format": "deepseek",
    "reasoning_in_content": False, "generation_prompt": "",
    "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
    "speculative.types": "none", "timings_per_token": False, "post_sampling_probs": False,
    "backend_sampling": False, "lora": [],
}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n  {{- '<|im_start|>' + message.role + '\n' + message.content"
    " + '<|im_end|>\n' -}}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\n' -}}\n{%- endif -%}"
)


def random_string(n: int = 32) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


class LlamaRenderer(Renderer):
    def __init__(self, server: LlamaServer, job: Job, output: Output) -> None:
        super().__init__(job, output)
        self.model = server.model_name
        self.id = "chatcmpl-" + random_string()
        self.created = int(time.time())

    def usage(self) -> dict[str, Any]:
        return {
            "completion_tokens": self.job.decoded,
            "prompt_tokens": self.job.prompt_tokens,
            "total_tokens": self.job.decoded + self.job.prompt_tokens,
            "prompt_tokens_details": {"cached_tokens": self.job.cached},
        }


class ChatRenderer(LlamaRenderer):
    def __init__(self, server: LlamaServer, job: Job, output: Output, include_usage: bool) -> None:
        super().__init__(server, job, output)
        self.include_usage = include_usage

    def _chunk(self, choices: list[Any]) -> dict[str, Any]:
        return {"choices": choices, "created": self.created, "id": self.id, "model": self.model,
                "system_fingerprint": BUILD_INFO, "object": "chat.completion.chunk"}

    def head(self) -> list[Any]:
        delta = {"role": "assistant", "content": None}
        return [self._chunk([{"finish_reason": None, "index": 0, "delta": delta}])]

    def chunk(self, i: int) -> Any:
        return self._chunk([{"finish_reason": None, "index": 0, "delta": self.output.delta(i)}])

    def tail(self) -> list[Any]:
        events = [self._chunk([{"finish_reason": self.output.finish_reason, "index": 0, "delta": {}}])]
        if self.include_usage:
            events.append({**self._chunk([]), "usage": self.usage()})
        events[-1]["timings"] = self.job.timings()
        return events

    def final(self) -> Any:
        message: dict[str, Any] = {"role": "assistant", "content": self.output.text}
        if self.output.tool_call:
            message["tool_calls"] = self.output.tool_calls()
        return {
            "choices": [{"finish_reason": self.output.finish_reason, "index": 0, "message": message}],
            "created": self.created, "model": self.model, "system_fingerprint": BUILD_INFO,
            "object": "chat.completion", "usage": self.usage(), "id": self.id, "timings": self.job.timings(),
        }


class CompletionRenderer(LlamaRenderer):
    def _body(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
                "created": self.created, "model": self.model, "system_fingerprint": BUILD_INFO,
                "object": "text_completion", "id": self.id}

    def chunk(self, i: int) -> Any:
        return self._body(self.output.pieces[i], None)

    def tail(self) -> list[Any]:
        return [{**self._body("", self.output.finish_reason), "usage": self.usage(),
                 "timings": self.job.timings()}]

    def final(self) -> Any:
        return {**self._body(self.output.text, self.output.finish_reason), "usage": self.usage(),
                "timings": self.job.timings()}


class NativeCompletionRenderer(LlamaRenderer):
    """llama.cpp's own /completion format: no OpenAI envelope and no [DONE] marker."""

    done_marker = None

    def __init__(self, server: LlamaServer, job: Job, output: Output, prompt_text: str,
                 body: dict[str, Any]) -> None:
        super().__init__(server, job, output)
        self.prompt_text = prompt_text
        fields = body.get("response_fields")
        self.response_fields: list[str] = [str(f) for f in fields] if isinstance(fields, list) else []
        stop = body.get("stop")
        temperature = body.get("temperature")
        self.settings = {**GENERATION_SETTINGS, "stop": stop if isinstance(stop, list) else [],
                         "stream": bool(body.get("stream")), "max_tokens": job.n_predict, "n_predict": job.n_predict}
        if isinstance(temperature, int | float):
            self.settings["temperature"] = float(temperature)
        self.streamed = False

    def chunk(self, i: int) -> Any:
        self.streamed = True
        text = self.output.pieces[i]
        return {"index": 0, "content": text, "tokens": [token_id(text.strip())], "stop": False,
                "id_slot": -1, "tokens_predicted": i + 1, "tokens_evaluated": self.job.prompt_tokens}

    def tail(self) -> list[Any]:
        return [self.final()]

    def final(self) -> Any:
        return pick_fields(self.response_fields, self._final())

    def _final(self) -> dict[str, Any]:
        return {
            "index": 0, "content": "" if self.streamed else self.output.text, "tokens": [],
            "id_slot": self.job.slot, "stop": True, "model": self.model,
            "tokens_predicted": self.job.decoded, "tokens_evaluated": self.job.prompt_tokens,
            "generation_settings": self.settings,
            "prompt": self.prompt_text, "has_new_line": False, "truncated": False,
            "stop_type": "limit" if self.output.finish_reason == "length" else "eos",
            "stopping_word": "", "tokens_cached": self.job.prompt_tokens + self.job.decoded,
            "timings": self.job.timings(),
        }


def pick_fields(paths: list[str], doc: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: only these keys ("a/b" reaches into objects), each under
    its path as written; paths that lead nowhere are left out. Empty: the whole answer."""
    if not paths:
        return doc
    picked: dict[str, Any] = {}
    for path in paths:
        value: Any = doc
        for key in path.split("/"):
            if not (isinstance(value, dict) and key in value):
                break
            value = value[key]
        else:
            picked[path] = value
    return picked


# Anthropic's stop_reason for the fake's finish reasons (llama.cpp's mapping)
ANTHROPIC_STOP = {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use"}


class AnthropicRenderer(LlamaRenderer):
    """POST /v1/messages: Anthropic's message, or its named-event stream (no [DONE]). Like the
    real one, ``input_tokens`` leaves out the prompt-cache hit, which is ``cache_read_input_tokens``."""

    done_marker = None

    def usage(self) -> dict[str, Any]:
        return {"cache_read_input_tokens": self.job.cached, "input_tokens": self.job.prompt_tokens - self.job.cached,
                "output_tokens": self.job.decoded}

    def _message(self, content: list[Any], stop_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "content": content, "model": self.model,
                "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}

    def head(self) -> list[Any]:
        events = [Named("message_start", {"type": "message_start",
                                          "message": self._message([], None, {**self.usage(), "output_tokens": 0})})]
        if self.output.tool_call is None and self.output.n_tokens:
            events.append(Named("content_block_start", {"type": "content_block_start", "index": 0,
                                                        "content_block": {"type": "text", "text": ""}}))
        return events

    def chunk(self, i: int) -> Any:
        call = self.output.tool_call
        if call is None:
            delta: dict[str, Any] = {"type": "text_delta", "text": self.output.pieces[i]}
        elif i == 0:
            return Named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": call.id, "name": call.name}})
        else:
            delta = {"type": "input_json_delta", "partial_json": self.output.pieces[i - 1]}
        return Named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def tail(self) -> list[Any]:
        events = []
        if self.output.n_tokens:
            events.append(Named("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(Named("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": ANTHROPIC_STOP[self.output.finish_reason], "stop_sequence": None},
            "usage": {"output_tokens": self.job.decoded}}))
        events.append(Named("message_stop", {"type": "message_stop"}))
        return events

    def final(self) -> Any:
        call = self.output.tool_call
        content: list[Any] = []
        if call is not None:
            try:
                arguments = json.loads(call.arguments)
            except ValueError:
                arguments = {}
            content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
        elif self.output.text:
            content.append({"type": "text", "text": self.output.text})
        return self._message(content, ANTHROPIC_STOP[self.output.finish_reason], self.usage())

    def stream_error(self, message: str) -> Any:
        return Named("error", {"code": 500, "message": message, "type": "server_error"})


class ResponsesRenderer(LlamaRenderer):
    """POST /v1/responses: OpenAI's Responses object, or its named-event stream (no [DONE]);
    ``input_tokens`` counts the whole prompt, the cache hit is in its details."""

    done_marker = None

    def __init__(self, server: LlamaServer, job: Job, output: Output) -> None:
        super().__init__(server, job, output)
        self.id = "resp_" + random_string()
        self.message_id = "msg_" + random_string()

    def usage(self) -> dict[str, Any]:
        return {"input_tokens": self.job.prompt_tokens, "output_tokens": self.job.decoded,
                "total_tokens": self.job.prompt_tokens + self.job.decoded,
                "input_tokens_details": {"cached_tokens": self.job.cached}}

    def _pending(self) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "status": "in_progress"}

    def _text_part(self) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": self.output.text}

    def _items(self) -> list[dict[str, Any]]:
        """The output items of the finished response."""
        call = self.output.tool_call
        if call is not None:
            return [{"id": "fc_" + call.id, "type": "function_call", "status": "completed",
                     "arguments": call.arguments, "call_id": "call_" + call.id, "name": call.name}]
        if not self.output.text:
            return []
        return [{"type": "message", "status": "completed", "id": self.message_id,
                 "content": [self._text_part()], "role": "assistant"}]

    def head(self) -> list[Any]:
        events = [Named("response.created", {"type": "response.created", "response": self._pending()}),
                  Named("response.in_progress", {"type": "response.in_progress", "response": self._pending()})]
        if self.output.tool_call is None and self.output.n_tokens:
            events += [
                Named("response.output_item.added", {"type": "response.output_item.added", "item": {
                    "content": [], "id": self.message_id, "role": "assistant", "status": "in_progress",
                    "type": "message"}}),
                Named("response.content_part.added", {"type": "response.content_part.added",
                                                      "item_id": self.message_id,
                                                      "part": {"type": "output_text", "text": ""}}),
            ]
        return events

    def chunk(self, i: int) -> Any:
        call = self.output.tool_call
        if call is None:
            return Named("response.output_text.delta", {"type": "response.output_text.delta",
                                                        "item_id": self.message_id, "delta": self.output.pieces[i]})
        if i == 0:
            return Named("response.output_item.added", {"type": "response.output_item.added", "item": {
                "id": "fc_" + call.id, "arguments": "", "call_id": "call_" + call.id, "name": call.name,
                "type": "function_call", "status": "in_progress"}})
        return Named("response.function_call_arguments.delta", {
            "type": "response.function_call_arguments.delta", "delta": self.output.pieces[i - 1],
            "item_id": "fc_" + call.id})

    def tail(self) -> list[Any]:
        events: list[Any] = []
        if self.output.tool_call is None and self.output.text:
            events += [
                Named("response.output_text.done", {"type": "response.output_text.done",
                                                    "item_id": self.message_id, "text": self.output.text}),
                Named("response.content_part.done", {"type": "response.content_part.done",
                                                     "item_id": self.message_id, "part": self._text_part()}),
            ]
        events += [Named("response.output_item.done", {"type": "response.output_item.done", "item": item})
                   for item in self._items()]
        events.append(Named("response.completed", {
            "type": "response.completed",
            "response": {"id": self.id, "object": "response", "created_at": int(time.time()), "status": "completed",
                         "model": self.model, "output": self._items(), "usage": self.usage()},
            "timings": self.job.timings()}))
        return events

    def final(self) -> Any:
        now = int(time.time())
        return {"completed_at": now, "created_at": now, "id": self.id, "model": self.model, "object": "response",
                "output": self._items(), "status": "completed", "usage": self.usage()}

    def stream_error(self, message: str) -> Any:
        # the real one sends a Responses stream's error as an unnamed OpenAI-style event
        return {"error": {"code": 500, "message": message, "type": "server_error"}}


class LlamaServer(FakeServer):
    name = "llama-server"
    server_header = "llama.cpp"
    json_charset = "utf-8"
    listen_while_loading = True

    # llama-server's /metrics counters (prompt/predict seconds are real wall time)
    COUNTERS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens"),
        ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache"),
        ("prompt_seconds_total", "Total time spent processing prompts"),
        ("tokens_predicted_total", "Number of generation tokens processed"),
        ("tokens_predicted_seconds_total", "Total time spent generating tokens"),
        ("n_decode_total", "Total number of llama_decode() calls, excluding speculative decoding and "
                           "multimodal decoding"),
        ("n_tokens_max", "Largest observed sequence length (prompt + generation)"),
        ("spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated"),
        ("spec_decode_num_accepted_tokens_total", "Speculative: Total draft tokens accepted by the target "
                                                  "model"),
        ("spec_decode_num_drafts_total", "Speculative: Total speculative decoding verification steps"),
    )

    def __init__(self, opts: dict[str, Any]) -> None:
        if opts["reranking"]:  # --reranking is --embeddings --pooling rank, as in llama.cpp's arg.cpp
            opts = {**opts, "embeddings": True, "pooling": "rank"}
        slots = opts["parallel"] if opts["parallel"] > 0 else AUTO_SLOTS
        super().__init__(opts, slots)
        self.model_name: str = opts["alias"] or opts["model"]
        self.n_ctx_slot: int = max(opts["ctx_size"] // slots, 1)
        self.counters: dict[str, float] = dict.fromkeys((name for name, _ in self.COUNTERS), 0.0)
        add = self.app.router
        add.add_get("/health", self.health)
        add.add_get("/v1/health", self.health)
        add.add_get("/props", self.props)
        add.add_get("/slots", self.get_slots)
        add.add_get("/metrics", self.metrics)
        add.add_get("/models", self.models)
        add.add_get("/v1/models", self.models)
        add.add_post("/tokenize", self.helper(self.tokenize))
        add.add_post("/detokenize", self.helper(self.detokenize))
        add.add_post("/apply-template", self.helper(self.apply_template))
        add.add_post("/chat/completions/input_tokens", self.helper(self.chat_input_tokens))
        add.add_post("/v1/chat/completions/input_tokens", self.helper(self.chat_input_tokens))
        add.add_post("/v1/messages", self.inference(self.messages))
        add.add_post("/v1/messages/count_tokens", self.helper(self.messages_count_tokens))
        add.add_post("/v1/responses", self.inference(self.responses))
        add.add_post("/responses", self.inference(self.responses))
        add.add_post("/v1/responses/input_tokens", self.helper(self.responses_input_tokens))
        add.add_post("/responses/input_tokens", self.helper(self.responses_input_tokens))
        add.add_post("/infill", self.inference(self.infill))
        for path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"):
            add.add_post(path, self.inference(self.rerank))
        add.add_post("/v1/chat/completions", self.inference(self.chat))
        add.add_post("/chat/completions", self.inference(self.chat))
        add.add_post("/v1/completions", self.inference(self.completions))
        add.add_post("/completions", self.inference(self.native_completion))
        add.add_post("/completion", self.inference(self.native_completion))
        add.add_post("/v1/embeddings", self.inference(self.embeddings))
        add.add_post("/embeddings", self.inference(self.native_embeddings))
        add.add_post("/embedding", self.inference(self.native_embeddings))

    # ---- envelopes ----

    def error_response(self, status: int, message: str, *, error_type: str | None = None,
                       headers: dict[str, str] | None = None,
                       extra: dict[str, Any] | None = None) -> web.Response:
        error = {"code": status, "message": message, "type": error_type or ERROR_TYPES.get(status, "server_error"),
                 **(extra or {})}
        return self.json({"error": error}, status, headers)

    def not_found(self) -> web.Response:
        return self.json({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}, 404)

    def loading_response(self, request: web.Request) -> web.StreamResponse | None:
        return self.json({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}, 503)

    def malformed_json(self, exc: Any, raw: bytes) -> web.Response:
        message = (f"[json.exception.parse_error.101] parse error at line {exc.lineno}, column {exc.colno}: "
                   f"syntax error while parsing value - {exc.msg}")
        # The real one (compared live in test_real_llama) answers a JSON parse error on every
        # route with 500 server_error: nlohmann's parse_error is not a std::invalid_argument,
        # which is what llama-server maps to 400. (shared/.../err_malformed_json.txt says 400.)
        return self.error_response(500, message)

    def log_listening(self) -> None:
        log(f"main: HTTP server is listening, hostname: {self.host}, port: {self.port}, http threads: 3")
        log("main: loading model")
        log(f"srv    load_model: loading model '{self.opts['model']}'")

    def log_bind_error(self, exc: OSError) -> None:
        log(f"srv    start: couldn't bind HTTP server socket, hostname: {self.host}, port: {self.port}: "
            f"{exc.strerror}")
        log("main: exiting due to HTTP server error")

    def log_ready(self) -> None:
        log("main: model loaded")
        log(f"main: server is listening on http://{self.host}:{self.port} - starting the main loop")
        log("srv  update_slots: all slots are idle")

    # ---- metrics bookkeeping ----

    def count_prompt(self, job: Job) -> None:
        self.counters["prompt_tokens_total"] += job.prompt_tokens - job.cached
        self.counters["prompt_tokens_cached_total"] += job.cached
        self.counters["n_decode_total"] += 1

    def count_token(self, job: Job) -> None:
        super().count_token(job)
        self.counters["tokens_predicted_total"] += 1
        self.counters["n_decode_total"] += 1

    def count_finished(self, job: Job, finish_reason: str) -> None:
        super().count_finished(job, finish_reason)
        timings = job.timings()
        self.counters["prompt_seconds_total"] += timings["prompt_ms"] / 1000.0
        self.counters["tokens_predicted_seconds_total"] += timings["predicted_ms"] / 1000.0
        self.counters["n_tokens_max"] = max(self.counters["n_tokens_max"], job.prompt_tokens + job.decoded)

    # ---- read-only routes ----

    async def health(self, request: web.Request) -> web.Response:
        if self.opts["fail_health"]:
            return self.error_response(503, "fake: --fail-health", error_type="unavailable_error")
        return self.json({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        return self.json({
            "default_generation_settings": {"params": SAMPLING_PARAMS, "n_ctx": self.n_ctx_slot},
            "total_slots": self.slots.size,
            "model_alias": self.model_name,
            "model_path": self.opts["model"],
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": self.opts["slots_endpoint"],
            "endpoint_props": False,
            "endpoint_metrics": self.opts["metrics"],
            "chat_template": CHAT_TEMPLATE,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "build_info": BUILD_INFO,
            "is_sleeping": False,
        })

    async def get_slots(self, request: web.Request) -> web.Response:
        if not self.opts["slots_endpoint"]:
            return self.error_response(501, "This server does not support slots endpoint. Start it with "
                                            "`--slots`")
        if request.query.get("fail_on_no_slot") and len(self.slots.running) == self.slots.size:
            return self.error_response(503, "no slot available")
        slots = []
        for slot_id in range(self.slots.size):
            slot: dict[str, Any] = {"id": slot_id, "n_ctx": self.n_ctx_slot, "speculative": False,
                                    "is_processing": slot_id in self.slots.running}
            if job := self.slots.running.get(slot_id):
                slot |= {"id_task": job.task_id, "n_prompt_tokens": job.prompt_tokens,
                         "n_prompt_tokens_processed": job.prompt_tokens - job.cached,
                         "n_prompt_tokens_cache": job.cached, "params": SAMPLING_PARAMS,
                         "next_token": [{"has_next_token": True, "has_new_line": False,
                                         "n_remain": max(job.n_predict - job.decoded, 0),
                                         "n_decoded": job.decoded}]}
            slots.append(slot)
        return self.json(slots)

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.opts["metrics"]:
            return self.error_response(501, "This server does not support metrics endpoint. Start it with "
                                            "`--metrics`")
        c = self.counters
        gauges = (
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             c["prompt_tokens_total"] / c["prompt_seconds_total"] if c["prompt_seconds_total"] else 0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             c["tokens_predicted_total"] / c["tokens_predicted_seconds_total"]
             if c["tokens_predicted_seconds_total"] else 0),
            ("requests_processing", "Number of requests processing", len(self.slots.running)),
            ("requests_deferred", "Number of requests deferred", self.slots.waiting),
            ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
             1 if c["n_decode_total"] else 0),
        )
        lines = []
        for kind, items in (("counter", [(n, h, c[n]) for n, h in self.COUNTERS]), ("gauge", gauges)):
            for name, help_text, value in items:
                # C++ ostream's default float formatting, which is what %g prints
                lines += [f"# HELP llamacpp:{name} {help_text}", f"# TYPE llamacpp:{name} {kind}",
                          f"llamacpp:{name} {value:g}"]
        return web.Response(body=("\n".join(lines) + "\n").encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4",
                                     "Process-Start-Time-Unix": str(int(self.started_at))})

    async def models(self, request: web.Request) -> web.Response:
        name = self.model_name
        return self.json({
            "models": [{"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                        "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": "",
                                                      "families": [""], "parameter_size": "",
                                                      "quantization_level": ""}}],
            "object": "list",
            # (no "architecture": this build sends it only in router mode; routes/models.http.txt)
            "data": [{"id": name, "aliases": [name], "tags": [], "object": "model",
                      "created": int(time.time()), "owned_by": "llamacpp",
                      "meta": {"vocab_type": 1, "n_vocab": 262144, "n_ctx": self.n_ctx_slot,
                               "n_ctx_train": 32768, "n_embd": self.opts["embedding_dim"],
                               "n_params": 268098176, "size": 246587904, "ftype": "Q4_K - Medium"}}],
        })

    # ---- generation ----

    def n_predict(self, body: dict[str, Any]) -> int:
        for key in ("n_predict", "max_completion_tokens", "max_tokens"):
            value = body.get(key)
            if isinstance(value, int) and value >= 0:
                return value
        # the real default (-1) generates until EOS or a full context; tests want short answers
        return self.opts["n_predict"] if self.opts["n_predict"] >= 0 else DEFAULT_MAX_TOKENS

    def new_job(self, prompt: list[str], body: dict[str, Any]) -> Job:
        if len(prompt) >= self.n_ctx_slot:
            raise RequestError(
                400, f"request ({len(prompt)} tokens) exceeds the available context size "
                     f"({self.n_ctx_slot} tokens), try increasing it",
                error_type="exceed_context_size_error",
                extra={"n_prompt_tokens": len(prompt), "n_ctx": self.n_ctx_slot})
        # generation stops at the end of the slot's context, like llama-server without context shift
        n = min(self.n_predict(body), self.n_ctx_slot - len(prompt))
        return Job(self.next_task_id(), prompt, n_predict=n)

    async def chat(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        tools = body.get("tools")
        if not self.opts["jinja"]:
            # runtime_error in llama.cpp, hence 500 rather than 400
            if isinstance(tools, list) and tools:
                raise RequestError(500, "tools param requires --jinja flag")
            if body.get("tool_choice", "auto") != "auto":
                raise RequestError(500, "tool_choice param requires --jinja flag")
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") not in (
                None, "", "text", "json_object", "json_schema"):
            raise RequestError(400, 'response_format type must be one of "text" or "json_object", but got: '
                                    f"{response_format.get('type')}")
        messages = self.chat_messages(body)
        job = self.new_job(chat_prompt(messages), body)
        output = plan_output(body, ctl, job.n_predict, random_string())
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        renderer = ChatRenderer(self, job, output, include_usage)
        return await self.generate(request, ctl, job, renderer, bool(body.get("stream")))

    @staticmethod
    def chat_messages(body: dict[str, Any]) -> list[Any]:
        """The messages of a chat request, checked as llama.cpp checks them."""
        if "messages" not in body:
            raise RequestError(400, "'messages' is required")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise RequestError(400, "Expected 'messages' to be an array")
        for message in messages:
            role = message.get("role") if isinstance(message, dict) else None
            if role != "assistant" and not (isinstance(message, dict) and "content" in message):
                raise RequestError(400, "All non-assistant messages must contain 'content'")
            if role == "assistant" and "content" not in message and "tool_calls" not in message:
                raise RequestError(400, "Assistant message must contain either 'content' or 'tool_calls'!")
        return messages

    async def chat_input_tokens(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """/chat/completions/input_tokens: the prompt size a chat request would be charged."""
        n = len(chat_prompt(self.chat_messages(body)))
        return self.json({"input_tokens": n, "object": "response.input_tokens"})

    # ---- Anthropic Messages and OpenAI Responses (llama.cpp converts both to a chat) ----

    @staticmethod
    def anthropic_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
        if "messages" not in body:
            raise RequestError(500, "'messages' is required")  # a runtime_error in llama.cpp, so a 500
        return anthropic_chat_messages(body)

    async def messages(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """POST /v1/messages. Like the real one it is permissive: no max_tokens is allowed (the
        real default is 4096, the fake's DEFAULT_MAX_TOKENS), ``messages`` that is not a list
        counts as none; ``n_predict`` is not read (the conversion drops it)."""
        messages = self.anthropic_messages(body)
        tools = [{"type": "function", "function": {"name": t.get("name", ""),
                                                   "parameters": t.get("input_schema") or {}}}
                 for t in body.get("tools") or () if isinstance(t, dict)]
        job = self.new_job(chat_prompt(messages), {"max_tokens": body.get("max_tokens")})
        output = plan_output({"tools": tools}, ctl, job.n_predict, random_string())
        return await self.generate(request, ctl, job, AnthropicRenderer(self, job, output), bool(body.get("stream")))

    async def messages_count_tokens(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return self.json({"input_tokens": len(chat_prompt(self.anthropic_messages(body)))})

    @staticmethod
    def responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
        if "input" not in body:
            raise RequestError(400, "'input' is required")
        if body.get("previous_response_id"):
            raise RequestError(400, "llama.cpp does not support 'previous_response_id'.")
        if not isinstance(body["input"], str | list):
            raise RequestError(400, "'input' must be a string or array of objects")
        return responses_chat_messages(body)

    async def responses(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """POST /v1/responses: ``max_output_tokens`` bounds the answer."""
        messages = self.responses_messages(body)
        tools = [{"type": "function", "function": {"name": t.get("name", ""), "parameters": t.get("parameters") or {}}}
                 for t in body.get("tools") or () if isinstance(t, dict)]
        job = self.new_job(chat_prompt(messages), {"max_tokens": body.get("max_output_tokens")})
        output = plan_output({"tools": tools}, ctl, job.n_predict, random_string())
        return await self.generate(request, ctl, job, ResponsesRenderer(self, job, output), bool(body.get("stream")))

    async def responses_input_tokens(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        n = len(chat_prompt(self.responses_messages(body)))
        return self.json({"input_tokens": n, "object": "response.input_tokens"})

    # ---- native completion, infill, rerank ----

    def _completion_job(self, body: dict[str, Any], ctl: Controls) -> tuple[Job, Output]:
        if "prompt" not in body:
            raise RequestError(500, '"prompt" is required')  # a runtime_error in llama.cpp, so a 500
        prompt = completion_prompt(body["prompt"])
        if not prompt:
            raise RequestError(500, '"prompt" must not be empty')
        job = self.new_job(prompt, body)
        # a completion has no tool calls; the control's other effects still apply
        ctl = msgspec.structs.replace(ctl, tool_call=False)
        return job, plan_output(body, ctl, job.n_predict, "")

    async def completions(self, request: web.Request, body: dict[str, Any],
                          ctl: Controls) -> web.StreamResponse:
        job, output = self._completion_job(body, ctl)
        renderer = CompletionRenderer(self, job, output)
        return await self.generate(request, ctl, job, renderer, bool(body.get("stream")))

    async def native_completion(self, request: web.Request, body: dict[str, Any],
                                ctl: Controls) -> web.StreamResponse:
        job, output = self._completion_job(body, ctl)
        prompt = body["prompt"]
        renderer = NativeCompletionRenderer(self, job, output, prompt if isinstance(prompt, str) else "", body)
        return await self.generate(request, ctl, job, renderer, bool(body.get("stream")))

    async def infill(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """POST /infill (llama.vscode, ...): /completion's answer for a fill-in-the-middle prompt.
        With --no-fim, the real error of a model without FIM tokens (Gemma 3's)."""
        if not self.opts["fim"]:
            raise RequestError(501, "Infill is not supported by this model: prefix token is missing. suffix token "
                                    "is missing. middle token is missing. ")
        extra = body.get("input_extra", [])
        if not isinstance(extra, list):
            raise RequestError(400, '"input_extra" must be an array of {"filename": string, "text": string}')
        for chunk in extra:
            if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
                raise RequestError(400, 'extra_context chunk must contain a "text" field with a string value')
            if not isinstance(chunk.get("filename", ""), str):
                raise RequestError(400, 'extra_context chunk\'s "filename" field must be a string')
        for key in ("input_prefix", "input_suffix"):
            if key not in body:
                # llama.cpp sets a 400 here but reads the key anyway: nlohmann's out_of_range, a 500
                raise RequestError(500, f"[json.exception.out_of_range.403] key '{key}' not found")
        words = infill_prompt(body)
        job = self.new_job(words, body)
        output = plan_output(body, msgspec.structs.replace(ctl, tool_call=False), job.n_predict, "")
        renderer = NativeCompletionRenderer(self, job, output, " ".join(words), body)
        return await self.generate(request, ctl, job, renderer, bool(body.get("stream")))

    async def rerank(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        """/rerank, /reranking, /v1/rerank, /v1/reranking (--reranking): Jina's shape
        (``documents``: results sorted by relevance_score, usage) or TEI's (``texts``: a bare
        list of {index, score[, text]}). Each document costs the words of query + document."""
        if not (self.opts["embeddings"] and self.opts["pooling"] == "rank"):
            raise RequestError(501, "This server does not support reranking. Start it with `--reranking`")
        if "query" not in body:
            raise RequestError(400, '"query" must be provided')
        query = body["query"]
        if not isinstance(query, str):
            raise RequestError(400, '"query" must be a string')
        tei = "texts" in body
        documents = body.get("documents", body.get("texts", []))
        if not isinstance(documents, list) or not documents:
            raise RequestError(400, '"documents" must be a non-empty string array')
        documents = [str(d) for d in documents]
        top_n = body.get("top_n", len(documents))
        words = [w for d in documents for w in query.split() + d.split()]
        job = Job(self.next_task_id(), words)
        label = "score" if tei else "relevance_score"

        def build() -> Any:
            ranked = sorted(({"index": i, label: rerank_score(query, d)} for i, d in enumerate(documents)),
                            key=lambda r: -r[label])[: max(int(top_n), 0)]
            if tei:
                if body.get("return_text"):
                    ranked = [{**r, "text": documents[r["index"]]} for r in ranked]
                return ranked
            return {"model": body.get("model", self.model_name), "object": "list",
                    "usage": {"prompt_tokens": len(words), "total_tokens": len(words)}, "results": ranked}

        return await self.answer(request, ctl, job, build)

    # ---- embeddings and tokenizer ----

    def _embedding_texts(self, body: dict[str, Any]) -> list[str]:
        if not self.opts["embeddings"]:
            raise RequestError(501, "This server does not support embeddings. Start it with `--embeddings`")
        if "input" in body:
            texts = embedding_inputs(body["input"])
        elif "content" in body:
            texts = embedding_inputs(body["content"])
        else:
            raise RequestError(400, '"input" or "content" must be provided')
        if not texts:
            raise RequestError(400, '"input" must not be empty')
        if any(not text.split() for text in texts):
            raise RequestError(400, "Input content cannot be empty")
        return texts

    async def embeddings(self, request: web.Request, body: dict[str, Any], ctl: Controls) -> web.StreamResponse:
        texts = self._embedding_texts(body)
        if self.opts["pooling"] == "none":
            raise RequestError(400, "Pooling type 'none' is not OAI compatible. Please use a different "
                                    "pooling type")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(400, "The format to return the embeddings in. Can be either float or base64")
        n_tokens = sum(len(text.split()) for text in texts)
        job = Job(self.next_task_id(), [w for text in texts for w in text.split()])
        dim = self.opts["embedding_dim"]

        def build() -> dict[str, Any]:
            data = []
            for i, text in enumerate(texts):
                vector = embedding(text, dim)
                if fmt == "base64":
                    data.append({"embedding": embedding_base64(vector), "index": i, "object": "embedding",
                                 "encoding_format": "base64"})
                else:
                    data.append({"embedding": vector, "index": i, "object": "embedding"})
            return {"model": body.get("model", self.model_name), "object": "list",
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, "data": data}

        return await self.answer(request, ctl, job, build)

    async def native_embeddings(self, request: web.Request, body: dict[str, Any],
                                ctl: Controls) -> web.StreamResponse:
        texts = self._embedding_texts(body)
        job = Job(self.next_task_id(), [w for text in texts for w in text.split()])
        dim = self.opts["embedding_dim"]
        return await self.answer(request, ctl, job, lambda: [
            {"index": i, "embedding": [embedding(text, dim)]} for i, text in enumerate(texts)])

    async def apply_template(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """llama-server's POST /apply-template: the chat prompt as text. Newlines are rendered
        as a visible "<nl>" word so /tokenize (a whitespace split) counts them as the chat does."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            return self.json({"error": {"code": 400, "message": "'messages' is required",
                                        "type": "invalid_request_error"}}, status=400)
        words = ["<nl>" if w == "\n" else w for w in chat_prompt(messages)]
        return self.json({"prompt": " ".join(words)})

    async def tokenize(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        # Not counted in /fake/stats' requests: llmd tokenizes abandoned prompts on its own.
        words = str(body.get("content", "")).split()
        if body.get("with_pieces"):
            tokens: list[Any] = [{"id": token_id(w), "piece": w} for w in words]
        else:
            tokens = [token_id(w) for w in words]
        return self.json({"tokens": tokens})

    async def detokenize(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        tokens = body.get("tokens")
        return self.json({"content": detokenize(tokens if isinstance(tokens, list) else [])})


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    early_sigterm()
    opts, _ = parse_cli(argv, FLAGS, DEFAULTS)
    run(LlamaServer(opts))

if __name__ == "__main__":
    main(sys.argv[1:])
