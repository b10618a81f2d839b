"""The route table and its pure parts: names, meters per protocol, legacy function calling,
Anthropic's error envelope, the config that names routes and default models. No I/O."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from llmd import configfile
from llmd.config import ConfigError, RouteName
from llmd.envelope import functions_to_tools
from llmd.errors import ApiError, overloaded
from llmd.exchange import Exchange
from llmd.launchers import LLAMA_SERVER_ROUTES, REMOTE_DEFAULT_ROUTES, VLLM_ROUTES
from llmd.legacy import LEGACY_FUNCTIONS
from llmd.meter import ANTHROPIC, RESPONSES, ZERO
from llmd.nativemeter import NATIVE
from llmd.routes import BY_NAME, BY_PATH, ROUTES
from tests.conftest import base_config, write_config


def test_route_names_agree_between_config_table_and_launchers() -> None:
    names = set(typing.get_args(RouteName))
    assert names == set(BY_NAME) == set(LLAMA_SERVER_ROUTES)
    assert VLLM_ROUTES <= names and set(REMOTE_DEFAULT_ROUTES) <= names
    assert len(BY_PATH) == sum(len(r.paths) for r in ROUTES), "a path is declared twice"


def _feed(meter, events: list[dict]) -> Exchange:
    ex = Exchange(t_start=0.0)
    for e in events:
        assert meter.event(json.dumps(e).encode(), ex, False)
    return ex


def test_anthropic_stream_meter_reads_start_deltas_and_final_usage() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 9, "cache_read_input_tokens": 3,
                                                             "output_tokens": 0}}}  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}
    ex = _feed(ANTHROPIC, [start, delta, delta])
    assert (ex.usage_seen, ex.prompt_seen, ex.prompt_tokens, ex.chunks) == (False, True, 12, 2)
    ex = _feed(ANTHROPIC, [start, delta, delta, end, {"type": "message_stop"}])
    assert (ex.usage_seen, ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens) == (True, 12, 2, 3)
    ex = _feed(ANTHROPIC, [start, {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}])
    assert ex.outcome == "upstream_error"


def test_responses_and_native_meters() -> None:
    ex = _feed(RESPONSES, [
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.output_text.delta", "delta": "a"},
        {"type": "response.output_text.delta", "delta": "b"},
        {"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": 2,
                                                              "input_tokens_details": {"cached_tokens": 1}}}},
    ])  # fmt: skip
    assert (ex.chunks, ex.prompt_tokens, ex.completion_tokens, ex.cached_tokens) == (2, 5, 2, 1)
    ex = _feed(NATIVE, [
        {"content": "a", "stop": False, "tokens_predicted": 1, "tokens_evaluated": 6},
        {"content": "b", "stop": False, "tokens_predicted": 2, "tokens_evaluated": 6},
    ])  # fmt: skip
    assert (ex.usage_seen, ex.chunks, ex.prompt_tokens, ex.completion_tokens) == (True, 2, 6, 2)
    ex = Exchange(t_start=0.0)
    NATIVE.whole(json.dumps({"content": "abcdefgh"}).encode(), ex)  # response_fields dropped the counts
    assert (ex.usage_seen, ex.completion_tokens) == (False, 2)
    ex = Exchange(t_start=0.0)  # llama.vscode's response_fields keep timings/predicted_n, flattened
    NATIVE.whole(json.dumps({"content": "ab", "timings/prompt_n": 4, "timings/predicted_n": 3}).encode(), ex)
    assert (ex.usage_seen, ex.completion_tokens) == (False, 3)
    ex = Exchange(t_start=0.0)  # n_cmpl: 2 answers to one prompt
    both = [{"content": "a", "tokens_evaluated": 5, "tokens_predicted": 2},
            {"content": "b", "tokens_evaluated": 5, "tokens_predicted": 3}]  # fmt: skip
    NATIVE.whole(json.dumps(both).encode(), ex)
    assert (ex.usage_seen, ex.prompt_tokens, ex.completion_tokens) == (True, 5, 5)
    ex = Exchange(t_start=0.0)
    ZERO.whole(b'{"tokens": [1, 2, 3]}', ex)
    assert (ex.usage_seen, ex.prompt_tokens, ex.completion_tokens) == (True, 0, 0)


def test_legacy_functions_go_up_as_tools_and_come_back_as_function_call() -> None:
    doc = {"model": "m", "messages": [], "functions": [{"name": "f", "parameters": {"type": "object"}}],
           "function_call": {"name": "f"}}  # fmt: skip
    functions_to_tools(doc)
    assert doc["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert doc["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert "functions" not in doc and "function_call" not in doc
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    answer = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]}
    back = json.loads(LEGACY_FUNCTIONS.whole(json.dumps(answer).encode()))
    assert back["choices"][0] == {"index": 0, "finish_reason": "function_call", "message": {
        "role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}}  # fmt: skip
    event = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]},
                          "finish_reason": None}]}  # fmt: skip
    back = json.loads(LEGACY_FUNCTIONS.event(json.dumps(event).encode()))
    assert back["choices"][0]["delta"] == {"function_call": {"arguments": '{"a"'}}
    plain = b'{"choices":[{"delta":{"content":"hi"}}]}'
    assert LEGACY_FUNCTIONS.event(plain) is plain  # untouched, not even re-encoded


@pytest.mark.parametrize("err,kind", [
    (ApiError(400, "bad"), "invalid_request_error"),
    (ApiError(401, "who"), "authentication_error"),
    (ApiError(404, "none"), "not_found_error"),
    (ApiError(429, "slow down"), "rate_limit_error"),
    (overloaded("busy", 3), "overloaded_error"),
    (ApiError(502, "gone"), "api_error"),
])  # fmt: skip
def test_anthropic_error_envelope(err: ApiError, kind: str) -> None:
    resp = err.response("anthropic")
    assert json.loads(resp.body) == {"type": "error", "error": {"type": kind, "message": err.message}}  # type: ignore[arg-type]
    assert resp.status == err.status and dict(resp.headers).items() >= err.headers.items()


def test_config_checks_default_models_and_remote_routes(tmp_path: Path) -> None:
    remote = {"backend": "openai", "urls": ["http://127.0.0.1:9/v1"], "routes": ["chat", "rerank"]}
    doc = base_config(tmp_path, {"m": remote}, server={"default_model": "m"},
                      keys=[{"id": "k", "sha256": "0" * 64, "default_model": "m", "models": ["m"]}])  # fmt: skip
    configfile.load(write_config(tmp_path / "c.yaml", doc))
    unknown = base_config(tmp_path, {"m": {**remote, "routes": ["chat", "teleport"]}})
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c.yaml", unknown))
    assert "models.m.routes: expected a list of one of 'chat'" in str(e.value) and "'teleport'" in str(e.value)
    bad = base_config(tmp_path, {"m": remote, "s": {"backend": "llama-server", "model": "x.gguf", "routes": ["chat"]}},
                      server={"default_model": "nope"},
                      keys=[{"id": "k", "sha256": "0" * 64, "default_model": "s", "models": ["m"]}])  # fmt: skip
    with pytest.raises(ConfigError) as e:
        configfile.load(write_config(tmp_path / "c.yaml", bad))
    text = "\n".join(e.value.errors)
    assert "models.s.routes: only for backend openai" in text
    assert "server.default_model: 'nope'" in text
    assert "keys[0].default_model: 's' is not in the key's models" in text
