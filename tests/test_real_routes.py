"""IDE and agent routes through llmd in front of the real llama-server, with real clients.

One `llmd serve` for the module: Gemma 3 270M on one llama-server replica (`--jinja`, two
slots), keys `dev` (admin, generous limits) and `tight` (requests_per_minute: 1),
`server.default_model` set. Each route's answer through llmd equals the replica's own answer
to the same request (temperature 0, same seed), and the ledger row equals the usage the client
saw. Where this small model cannot serve a route (/infill needs FIM tokens), llmd relays the
engine's own error exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.capture_routes import LLAMA_VSCODE_INFILL
from tests.conftest import base_config
from tests.fakeproc import free_port
from tests.realllmd import LLAMA, MODEL, RealLlmd, call, real_llmd

pytestmark = pytest.mark.real

DEV, TIGHT = "sk-dev-routes", "sk-tight-routes"
SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@pytest.fixture(scope="module")
def llmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLlmd]:
    tmp = tmp_path_factory.mktemp("real-routes")
    doc = base_config(
        tmp,
        {"gemma": {"backend": "llama-server", "model": str(MODEL), "cpus": [[0]], "aliases": ["claude-test"],
                   "args": ["-c", "2048", "-np", "2", "-t", "1", "--jinja"]},
         # The small model reranks (meaningless scores, the real shape): enough to prove the route.
         "gemma-rerank": {"backend": "llama-server", "model": str(MODEL), "cpus": [[1]],
                          "args": ["--reranking", "-c", "1024", "-np", "1", "-t", "1"]}},
        server={"port": free_port(), "drain_seconds": 5, "default_model": "gemma"},
        tiers={"std": {"requests_per_minute": 1000}, "tight": {"requests_per_minute": 1}},
        keys=[{"id": "dev", "tier": "std", "sha256": sha(DEV), "admin": True},
              {"id": "tight", "tier": "tight", "sha256": sha(TIGHT)}],
        launchers={"llama-server": {"command": str(LLAMA), "start_timeout_s": 120, "health_interval_s": 0.5}},
        routing={"timeouts": {"connect_s": 2, "first_byte_s": 120, "total_s": 300}},
    )  # fmt: skip
    with real_llmd(tmp, doc) as srv:
        yield srv


def anthropic_client(llmd: RealLlmd, key: str = DEV) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=llmd.url, api_key=key, max_retries=0, timeout=120)


def test_anthropic_messages_create_equals_the_replica_and_the_ledger(llmd: RealLlmd) -> None:
    body = {"model": "claude-test", "max_tokens": 12, "system": SYSTEM, "messages": MESSAGES}
    sampling = {"temperature": 0, "seed": 7}  # llama-server reads them; this SDK version has no such arguments
    n = llmd.settled_count(DEV)
    msg = anthropic_client(llmd).messages.create(**body, extra_body=sampling)  # type: ignore[arg-type]
    status, _, raw = call(llmd.replica(DEV, "gemma") + "/v1/messages", {**body, **sampling, "model": "gemma"})
    direct = json.loads(raw)
    assert status == 200 and msg.type == "message"
    assert [b.text for b in msg.content if b.type == "text"] == [b["text"] for b in direct["content"]]
    row = llmd.row_after(n)
    assert row["route"] == "messages" and row["model"] == "gemma" and row["key_id"] == "dev"
    u = msg.usage
    prompt = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, u.output_tokens)


def test_anthropic_stream_and_count_tokens(llmd: RealLlmd) -> None:
    client = anthropic_client(llmd)
    n = llmd.settled_count(DEV)
    with client.messages.stream(model="claude-test", max_tokens=10, system=SYSTEM, messages=MESSAGES,  # type: ignore[arg-type]
                                extra_body={"temperature": 0}) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and text == "".join(b.text for b in final.content if b.type == "text")
    row = llmd.row_after(n)
    u = final.usage
    assert row["route"] == "messages" and row["stream"] == 1 and row["token_method"] == "upstream"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        u.input_tokens + (u.cache_read_input_tokens or 0), u.output_tokens)  # fmt: skip
    counted = client.messages.count_tokens(model="claude-test", system=SYSTEM, messages=MESSAGES)  # type: ignore[arg-type]
    assert counted.input_tokens > 0
    row = llmd.row_after(n + 1)
    assert (row["route"], row["prompt_tokens"], row["completion_tokens"]) == ("count_tokens", 0, 0)


def test_anthropic_sdk_raises_its_own_errors_from_llmd(llmd: RealLlmd) -> None:
    tight = anthropic_client(llmd, TIGHT)
    tight.messages.create(model="claude-test", max_tokens=1, messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError) as e:
        tight.messages.create(model="claude-test", max_tokens=1, messages=MESSAGES)  # type: ignore[arg-type]
    assert e.value.response.headers["retry-after"]
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(llmd, "sk-wrong").messages.create(model="claude-test", max_tokens=1, messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client(llmd).messages.create(model="no-such-model", max_tokens=1, messages=MESSAGES)  # type: ignore[arg-type]


def test_openai_responses_create_and_stream(llmd: RealLlmd) -> None:
    client = openai.OpenAI(base_url=llmd.url + "/v1", api_key=DEV, max_retries=0, timeout=120)
    n = llmd.settled_count(DEV)
    r = client.responses.create(model="gemma", instructions=SYSTEM, input="Name three colours.",
                                max_output_tokens=12, temperature=0)  # fmt: skip
    status, _, raw = call(llmd.replica(DEV, "gemma") + "/v1/responses",
                          {"model": "gemma", "instructions": SYSTEM, "input": "Name three colours.",
                           "max_output_tokens": 12, "temperature": 0})  # fmt: skip
    assert status == 200 and r.output_text == _responses_text(json.loads(raw))
    row = llmd.row_after(n)
    assert r.usage is not None and row["route"] == "responses"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (r.usage.input_tokens, r.usage.output_tokens)
    events = list(client.responses.create(model="gemma", input="Name three colours.", max_output_tokens=8,
                                          temperature=0, stream=True))  # fmt: skip
    done = [e for e in events if e.type == "response.completed"]
    assert done and done[0].response.usage is not None
    row = llmd.row_after(n + 1)
    assert row["stream"] == 1 and row["completion_tokens"] == done[0].response.usage.output_tokens
    assert row["prompt_tokens"] == done[0].response.usage.input_tokens


def _responses_text(doc: dict[str, Any]) -> str:
    return "".join(c.get("text", "") for o in doc.get("output", []) if o.get("type") == "message"
                   for c in o.get("content", []))  # fmt: skip


def test_llama_native_routes_without_model(llmd: RealLlmd) -> None:
    """llama.vscode's /infill (no model: the default serves it) gets the engine's own answer
    (this model has no FIM tokens: its exact error); /completion equals the replica's; the
    /tokenize + /detokenize round trip; the ledger names each route."""
    n = llmd.settled_count(DEV)
    via = call(llmd.url + "/infill", LLAMA_VSCODE_INFILL, DEV)
    infill = call(llmd.replica(DEV, "gemma") + "/infill", LLAMA_VSCODE_INFILL)
    assert (via[0], json.loads(via[2])) == (infill[0], json.loads(infill[2]))
    assert infill[0] == 501, "this model has no FIM tokens: the engine says so, and llmd relays it"
    body = {"prompt": "The colours of the rainbow are", "n_predict": 8, "temperature": 0, "seed": 1}
    via = call(llmd.url + "/completion", body, DEV)
    direct = call(llmd.replica(DEV, "gemma") + "/completion", body)
    assert via[0] == direct[0] == 200
    got, want = json.loads(via[2]), json.loads(direct[2])
    assert got["content"] == want["content"]
    rows = [llmd.row_after(n), llmd.row_after(n + 1)]
    assert (rows[0]["route"], rows[0]["status"], rows[0]["outcome"]) == ("infill", 501, "upstream_error")
    assert rows[1]["route"] == "completion"
    assert (rows[1]["prompt_tokens"], rows[1]["completion_tokens"]) == (
        got["tokens_evaluated"],
        got["tokens_predicted"],
    )
    status, _, raw = call(llmd.url + "/tokenize", {"content": "Hello colourful world", "with_pieces": False}, DEV)
    tokens = json.loads(raw)["tokens"]
    assert status == 200 and tokens == json.loads(call(llmd.replica(DEV, "gemma") + "/tokenize",
                                                       {"content": "Hello colourful world"})[2])["tokens"]  # fmt: skip
    status, _, raw = call(llmd.url + "/detokenize", {"tokens": tokens}, DEV)
    assert status == 200 and json.loads(raw)["content"].strip() == "Hello colourful world"
    tok, detok = llmd.row_after(n + 2), llmd.row_after(n + 3)
    assert [(r["route"], r["prompt_tokens"], r["completion_tokens"]) for r in (tok, detok)] == [
        ("tokenize", 0, 0),
        ("detokenize", 0, 0),
    ]


def test_unprefixed_openai_paths_and_models(llmd: RealLlmd) -> None:
    c = openai.OpenAI(base_url=llmd.url, api_key=DEV, max_retries=0, timeout=120)
    r = c.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens > 0
    assert {m.id for m in c.models.list()} >= {"gemma", "claude-test"}


def test_rerank_equals_the_replica_and_bills_its_prompt(llmd: RealLlmd) -> None:
    body = {"model": "gemma-rerank", "query": "What is the capital of France?",
            "documents": ["Paris is the capital of France.", "Bananas are yellow."], "top_n": 2}  # fmt: skip
    n = llmd.settled_count(DEV)
    status, _, raw = call(llmd.url + "/v1/rerank", body, DEV)
    d_status, _, d_raw = call(llmd.replica(DEV, "gemma-rerank") + "/v1/rerank", body)
    got, want = json.loads(raw), json.loads(d_raw)
    assert (status, d_status) == (200, 200) and got["results"] == want["results"]
    row = llmd.row_after(n)
    assert (row["route"], row["model"], row["prompt_tokens"], row["completion_tokens"]) == (
        "rerank", "gemma-rerank", got["usage"]["prompt_tokens"], 0)  # fmt: skip
