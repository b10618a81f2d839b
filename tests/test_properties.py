"""Property tests (hypothesis) of the pure parts of the request path: the envelope decoder and
the body llmd sends upstream, the SSE splitter and the relay's usage reading, and the limiter.

Deterministic (``derandomize``, no example database) so that CI sees the same examples each run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmd.auth import Principal
from llmd.config import LimitFields
from llmd.envelope import Envelope, upstream_body
from llmd.envelope import decode as decode_envelope
from llmd.errors import ApiError
from llmd.exchange import Exchange
from llmd.limits import MINUTE, Grant, Limiter, MonthlyCounter, month_of
from llmd.meter import OPENAI
from llmd.sse import EventSplitter, data_of

PROPS = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    # Health checks judge generation speed, which a loaded CI machine varies: never a failure here.
    suppress_health_check=list(HealthCheck),
)

REQUIRED = ("messages", "prompt", "input", "query")
ENVELOPE_FIELDS = frozenset(f.name for f in msgspec.structs.fields(Envelope))

# --- JSON, valid and not -------------------------------------------------------------------------

# Text without lone surrogates (JSON that carries one is not valid UTF-8 once decoded).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def dumps(value: Any, spaced: bool, ascii_only: bool = True) -> bytes:
    seps = (", ", ": ") if spaced else (",", ":")
    return json.dumps(value, separators=seps, ensure_ascii=ascii_only).encode()


# Pieces that JSON parsers disagree on or reject: numbers out of float range, huge integers,
# lone surrogates, control characters, invalid UTF-8, non-JSON literals.
ODD_SCALARS = [
    b"1e999", b"-1e999", b"1E400", b"2e308", b"123456789012345678901234567890", b"-0", b"1.5e+308",
    b"01", b"1.", b".5", b"NaN", b"Infinity", b"-", b"tru", b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\u0000"',
    b'"\xff\xfe"', b'"\xc3"', b'"a\nb"', b'"\\x41"', b'"', b"[", b"{", b"}", b"null", b"true", b'"m"', b"[]",
    b"{}", b"0", b"-1", b"1", b"1.0", b"9223372036854775808",
]  # fmt: skip


@st.composite
def hostile_json(draw: st.DrawFn, depth: int = 0) -> bytes:
    """JSON-ish text: mostly well-formed structure with odd scalars and whitespace inside."""
    ws = draw(st.sampled_from([b"", b" ", b"\n", b"\t", b"\r\n", b"\xc2\xa0"]))
    kind = draw(st.integers(0, 5 if depth < 3 else 1))
    if kind == 0:
        return ws + draw(st.sampled_from(ODD_SCALARS)) + ws
    if kind == 1:
        return dumps(draw(json_values), draw(st.booleans()), draw(st.booleans()))
    if kind == 2:
        items = draw(st.lists(hostile_json(depth + 1), max_size=3))
        return b"[" + b",".join(items) + b"]"
    keys = draw(st.lists(st.sampled_from([*ENVELOPE_FIELDS, "fake", "", "model"]) | text, min_size=0, max_size=5))
    members = [dumps(k, False) + b":" + ws + draw(hostile_json(depth + 1)) for k in keys]
    return b"{" + ws + b",".join(members) + ws + b"}"


@st.composite
def envelope_docs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A body llmd must accept, with its required field for one route."""
    required = draw(st.sampled_from(REQUIRED))
    doc: dict[str, Any] = {"model": draw(text.filter(bool))}
    if required == "messages":
        doc["messages"] = draw(st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": text}), max_size=3))
    else:
        doc[required] = draw(text | st.lists(text, max_size=3) | st.lists(st.integers(0, 2**31), max_size=3))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "stream": st.none() | st.booleans(),
        "max_tokens": st.none() | st.integers(1, 2**62),
        "max_completion_tokens": st.none() | st.integers(1, 2**62),
        "n": st.none() | st.integers(1, 128),
        "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.none() | st.booleans()}),
        # OpenAI's legacy function calling, translated to tools when present: any shape.
        "functions": json_values,
        "function_call": json_values,
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            doc[name] = draw(strategy)
    extra = draw(st.dictionaries(text.filter(lambda k: k not in ENVELOPE_FIELDS), json_values, max_size=3))
    doc.update(extra)
    keys = list(doc)
    order = draw(st.permutations(keys))
    return {k: doc[k] for k in order}, required


def _check_decoded_or_400(body: bytes, required: str) -> Envelope | None:
    try:
        return decode_envelope(body, required)
    except ApiError as e:
        assert e.status == 400, (body, e.status, e.message)
        assert e.type == "invalid_request_error" and e.message
        msgspec.json.decode(e.body())  # renders as JSON
        return None


def _check_upstream_body(body: bytes, env: Envelope) -> None:
    """The bytes sent upstream: the original, or (alias, hidden usage) a re-encoding that still
    says what the client said; never an exception other than the client's 400."""
    try:
        whole = msgspec.json.decode(body)
    except msgspec.DecodeError:
        whole = None  # the envelope decoder skips fields it does not read; a full decode may not
    # The pipeline always names a model upstream: the body's, or the default it resolved.
    for upstream in (env.model or "default-model", "upstream-name"):
        try:
            # As the pipeline calls it on chat: legacy `functions` translated when present.
            out, hidden = upstream_body(body, env, upstream, True, bool(env.functions))
        except ApiError as e:
            assert e.status == 400 and whole is None, (body, e.message)
            continue
        if whole is None:
            continue  # passed on untouched or with include_usage inserted: the upstream judges it
        doc = msgspec.json.decode(out)
        assert doc["model"] == upstream
        assert hidden == (bool(env.stream) and not (env.stream_options and env.stream_options.include_usage))
        if hidden:
            assert doc["stream_options"]["include_usage"] is True
        translated = ("functions", "function_call", "tools", "tool_choice") if env.functions else ()
        for k, v in whole.items():
            if k not in ("model", "stream_options", *translated):
                assert _same(doc[k], v), k


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


@st.composite
def valid_with_a_hostile_member(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid body with one member llmd does not read set to an odd scalar, spliced in as text
    (the envelope decoder skips it; a re-encoding does not)."""
    doc, required = draw(envelope_docs())
    body = dumps(doc, draw(st.booleans()))
    member = (
        dumps(draw(text.filter(lambda k: k not in ENVELOPE_FIELDS)), False) + b":" + draw(st.sampled_from(ODD_SCALARS))
    )
    return b"{" + member + b"," + body[1:], required


@PROPS
@given(st.tuples(st.binary(max_size=200) | hostile_json(), st.sampled_from(REQUIRED)) | valid_with_a_hostile_member())
@example((b'{"messages": [], "stream": true}', "messages"))  # no model: the default one goes upstream
@example((b'{"model": "m", "x": 1e999, "stream": true, "stream_options": {}, "messages": []}', "messages"))
def test_envelope_decoder_accepts_or_says_400_for_any_bytes(item: tuple[bytes, str]) -> None:
    """Any bytes: an Envelope, or an ApiError 400 in llmd's envelope (never another exception);
    and an accepted body always makes an upstream body (or a 400)."""
    body, required = item
    env = _check_decoded_or_400(body, required)
    if env is not None:
        assert getattr(env, required)
        _check_upstream_body(body, env)


@PROPS
@given(json_values, st.sampled_from(REQUIRED), st.booleans())
def test_envelope_decoder_accepts_or_says_400_for_any_json_value(value: Any, required: str, spaced: bool) -> None:
    body = dumps(value, spaced)
    env = _check_decoded_or_400(body, required)
    if env is not None:
        _check_upstream_body(body, env)


@PROPS
@given(envelope_docs(), st.booleans(), st.booleans(), st.data())
def test_envelope_fields_round_trip(
    item: tuple[dict[str, Any], str], spaced: bool, ascii_only: bool, data: st.DataObject
) -> None:
    """A valid body decodes to exactly its fields; the raw ones keep their bytes. Replacing one
    read field by any JSON value is still an Envelope or a 400."""
    doc, required = item
    body = dumps(doc, spaced, ascii_only)
    env = decode_envelope(body, required)
    assert env.model == doc["model"]
    assert env.stream == doc.get("stream", False)
    for name in ("max_tokens", "max_completion_tokens", "n"):
        assert getattr(env, name) == doc.get(name)
    if "stream_options" not in doc:
        assert env.stream_options is msgspec.UNSET
    elif doc["stream_options"] is None:
        assert env.stream_options is None
    else:
        assert env.stream_options.include_usage == doc["stream_options"].get("include_usage")
    assert msgspec.json.decode(bytes(getattr(env, required))) == doc[required]
    _check_upstream_body(body, env)

    bad = dict(doc)
    bad[data.draw(st.sampled_from(sorted(ENVELOPE_FIELDS)))] = data.draw(json_values)
    env2 = _check_decoded_or_400(dumps(bad, spaced), required)
    if env2 is not None:
        _check_upstream_body(dumps(bad, spaced), env2)


# --- SSE: any cut of a stream is the same stream ----------------------------------------------------


@dataclass
class Stream:
    wire: bytes
    payloads: list[bytes]  # each event's data, in order (b"[DONE]" last)
    tokens: int  # token-bearing chunks
    prompt_tokens: int
    completion_tokens: int


@st.composite
def sse_streams(draw: st.DrawFn) -> Stream:
    """A chat stream as upstreams write it: role chunk, content chunks, finish, usage, [DONE];
    compact or spaced JSON; each line ending in \\n, \\r\\n or \\r; ``data:`` with or without
    the space; sometimes a comment line or a multi-line data field."""
    spaced = draw(st.booleans())
    contents = draw(st.lists(text, max_size=12))
    prompt_tokens = draw(st.integers(0, 5000))
    completion_tokens = draw(st.integers(0, 5000))
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks: list[dict[str, Any]] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": c}}]} for c in contents]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    chunks.append({**base, "choices": [], "usage": usage})
    payloads = [dumps(c, spaced, draw(st.booleans())) for c in chunks] + [b"[DONE]"]

    lines: list[bytes] = []
    ends: list[bytes] = []  # each line's end

    def line(content: bytes) -> None:
        end = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        if not content and ends and ends[-1] == b"\r" and end == b"\n":
            end = b"\r"  # "\r" then "\n" would be one line end ("\r\n"), not an empty line
        lines.append(content)
        ends.append(end)

    for i, payload in enumerate(payloads):
        if draw(st.integers(0, 9)) == 0:
            line(b": keep-alive")
        prefix = draw(st.sampled_from([b"data: ", b"data:"]))
        if payload != b"[DONE]" and draw(st.integers(0, 3)) == 0:
            # The same data over two data lines, joined by "\n": after a comma, where JSON allows it.
            cut = payload.find(b",") + 1
            joined = payload[:cut] + b"\n" + payload[cut:]
            if cut and json.loads(joined) == json.loads(payload):
                line(prefix + payload[:cut])
                # A value starting with a space needs "data: " (the reader drops one space).
                line((b"data: " if payload[cut:].startswith(b" ") else prefix) + payload[cut:])
                line(b"")
                payloads[i] = joined
                continue
        line(prefix + payload)
        line(b"")
    wire = b"".join(content + end for content, end in zip(lines, ends, strict=True))
    tokens = sum(1 for c in contents if c)
    return Stream(wire, payloads, tokens, prompt_tokens, completion_tokens)


@st.composite
def cut_points(draw: st.DrawFn, wire: bytes) -> list[int]:
    """Where reads end: anywhere, and often right after a "\r" (the cut that splits a "\r\n")."""
    after_cr = [i + 1 for i, b in enumerate(wire) if b == 13]
    anywhere = draw(st.lists(st.integers(0, len(wire)), max_size=30))
    return anywhere + (draw(st.lists(st.sampled_from(after_cr), max_size=20)) if after_cr else [])


def _split(splitter: EventSplitter, wire: bytes, cuts: list[int]) -> list[list[bytes]]:
    """The events of each read, the last one being close()."""
    points = sorted(set(cuts))
    reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    return [splitter.feed(r) for r in reads if r] + [splitter.close()]


@PROPS
@given(sse_streams(), st.data())
def test_any_split_of_a_stream_yields_the_same_events_and_data(stream: Stream, data: st.DataObject) -> None:
    cuts = data.draw(cut_points(stream.wire))
    whole = [e for batch in _split(EventSplitter(), stream.wire, []) for e in batch]
    pieces = [e for batch in _split(EventSplitter(), stream.wire, cuts) for e in batch]
    assert pieces == whole
    fields = [data_of(e) for e in whole]
    assert [d for d in fields if d is not None] == stream.payloads


def _relayed(events: list[bytes], ex: Exchange, hide_usage: bool) -> bytes:
    """What Relay._stream writes to the client for one read's events."""
    parts: list[bytes] = []
    for ev in events:
        payload = data_of(ev)
        if payload is None or OPENAI.event(payload, ex, hide_usage):
            parts += [ev, b"\n\n"]
    return b"".join(parts)


@PROPS
@given(sse_streams(), st.data(), st.booleans())
def test_any_split_gives_the_relay_the_same_usage(stream: Stream, data: st.DataObject, hide_usage: bool) -> None:
    """The relay's loop (relay.Relay._stream: split, data_of, the route's meter) over the reads
    of any split: the same tokens, usage and relayed bytes as over the whole stream; the usage
    chunk is dropped exactly when llmd asked for it."""
    cuts = data.draw(cut_points(stream.wire))
    results = []
    for points in ([], cuts):
        ex = Exchange(t_start=0.0)
        out = b"".join(_relayed(batch, ex, hide_usage) for batch in _split(EventSplitter(), stream.wire, points))
        results.append((ex.prompt_tokens, ex.completion_tokens, ex.chunks, ex.usage_seen, out))
    assert results[0] == results[1]
    prompt, completion, chunks, seen, out = results[0]
    assert (prompt, completion, chunks, seen) == (stream.prompt_tokens, stream.completion_tokens, stream.tokens, True)
    assert (b'"usage"' in out) == (not hide_usage)


# --- limits -----------------------------------------------------------------------------------------

T0 = 1_800_000_000.0  # mid-January 2027 UTC: a whole run stays in one month
TPM = 1000


@dataclass
class Held:
    grant: Grant
    at: float
    reserved: int


@dataclass
class Done:
    at: float
    reserved: int
    used: int


@dataclass
class Model:
    held: list[Held] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    refused: int = 0


steps = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "settle", "cancel"]),
        st.floats(0, 40, allow_nan=False),  # seconds since the previous step
        st.integers(1, TPM + 50),  # admit: reservation (some over the limit)
        st.integers(0, 10**6),  # settle/cancel: which held grant
        st.floats(0, 1.0) | st.floats(1.0, 2.0),  # settle: used / reserved (sometimes more)
    ),
    max_size=80,
)


@PROPS
@given(steps, st.integers(1, 8) | st.none(), st.booleans())
def test_limits_hold_over_any_sequence_of_admit_settle_cancel(
    ops: list[tuple[str, float, int, int, float]], max_concurrent: int | None, monthly: bool
) -> None:
    """Random admissions, settlements (used tokens, sometimes over the reservation) and
    cancellations (release(0)) at increasing times, against tokens_per_minute=1000:
    - in_flight is the number held, never negative, never over max_concurrent;
    - within any 60 s window, the tokens of the requests admitted in it (each counted as
      min(used, reserved): what a reservation can vouch for) stay within tokens_per_minute;
      while no request used more than it reserved, the window's count is never over it;
    - once all are released, in_flight == 0 and the monthly reservation is 0, and the month's
      use is the sum of what they used."""
    p = Principal(
        "k",
        "t",
        LimitFields(tokens_per_minute=TPM, max_concurrent=max_concurrent, monthly_tokens=10**9 if monthly else None),
        None,
    )
    counter = MonthlyCounter()
    counter.month = month_of(T0)
    lim = Limiter(monthly=counter)
    model = Model()
    now = T0
    for action, dt, reserve, pick, ratio in ops:
        now += dt
        if action == "admit":
            try:
                g = lim.admit(p, reserve, now=now)
            except ApiError as e:
                assert e.status == 429 and int(e.headers["Retry-After"]) >= 1
                model.refused += 1
            else:
                model.held.append(Held(g, now, reserve))
        elif model.held:
            h = model.held.pop(pick % len(model.held))
            used = round(h.reserved * ratio) if action == "settle" else 0
            h.grant.release(used, now=now)
            model.done.append(Done(h.at, h.reserved, used))
        s = lim.state("k")
        assert s.in_flight == len(model.held) >= 0
        if max_concurrent is not None:
            assert s.in_flight <= max_concurrent
        if all(d.used <= d.reserved for d in model.done):
            s.prune(now)
            assert 0 <= s.tokens_in_window <= TPM  # nobody used more than reserved: never over
    for h in model.held:
        now += 1
        h.grant.release(h.reserved, now=now)
        model.done.append(Done(h.at, h.reserved, h.reserved))
    s = lim.state("k")
    assert s.in_flight == 0
    assert counter.reserved.get("k", 0) == 0
    assert counter.used.get("k", 0) == sum(d.used for d in model.done)
    for d in model.done:  # every window that ends at an admission
        window = [x for x in model.done if d.at - MINUTE < x.at <= d.at]
        assert sum(min(x.used, x.reserved) for x in window) <= TPM


def test_a_request_that_outlived_its_window_counts_its_excess_whatever_ran_in_between() -> None:
    """Found while writing the limiter property: a stream admitted at 0 s reserving 100 ends at
    120 s having used 5000. Its reservation left the window at 60 s, so the 4900 beyond it
    count in the minute after 120 s, whether or not an admission pruned the entry in between
    (prune is lazy: once only the pruned case counted them, the other dropped all 5000)."""
    counted = []
    for other_admission in (False, True):
        lim, p = Limiter(), Principal("k", "t", LimitFields(tokens_per_minute=10_000), None)
        g = lim.admit(p, 100, now=T0)
        if other_admission:
            lim.admit(p, 1, now=T0 + 70).release(1, now=T0 + 70)
        g.release(5000, now=T0 + 120)
        s = lim.state("k")
        s.prune(T0 + 121)
        counted.append(s.tokens_in_window - (1 if other_admission else 0))
    assert counted[0] == counted[1] == 4900
