"""The envelope: the few fields of a request body llmd reads, decoded without touching the rest.

Everything else in the body stays in its raw bytes and goes upstream untouched; llmd
re-encodes only when something must change (the upstream's model name, or
``stream_options.include_usage`` that llmd needs to count a stream's tokens).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .errors import ApiError, bad_request

Positive = Annotated[int, msgspec.Meta(ge=1)]
NPredict = Annotated[int, msgspec.Meta(ge=-1)]  # llama.cpp: -1 = until the context is full, 0 = prompt only


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class Envelope(msgspec.Struct):
    """The request fields llmd reads, for every protocol it relays (OpenAI, Anthropic,
    Responses, llama.cpp native). Absent fields cost nothing; a route says which it needs."""

    model: str = ""  # empty: server.default_model or the key's default_model serves it
    stream: bool | None = False
    # >= 1: they size the token reservation, so a negative one would switch the limits off.
    max_tokens: Positive | None = None  # OpenAI (legacy), Anthropic
    max_completion_tokens: Positive | None = None  # OpenAI chat
    max_output_tokens: Positive | None = None  # OpenAI Responses
    n_predict: NPredict | None = None  # llama.cpp native
    n: Positive | None = None
    n_cmpl: Positive | None = None  # llama.cpp native: parallel completions, each one a slot's work
    # UNSET (absent) differs from None (``"stream_options": null``): only when absent may
    # llmd add the field by inserting bytes; a present one is re-encoded (JSON parsers keep
    # the last duplicate key, so an inserted field in front of a null would be overridden).
    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET
    # Raw: kept as bytes, never decoded (an empty Raw means absent; Raw | None is not a msgspec type).
    messages: msgspec.Raw = msgspec.Raw(b"")
    prompt: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")
    system: msgspec.Raw = msgspec.Raw(b"")  # Anthropic
    instructions: msgspec.Raw = msgspec.Raw(b"")  # Responses
    input_prefix: msgspec.Raw = msgspec.Raw(b"")  # /infill
    input_suffix: msgspec.Raw = msgspec.Raw(b"")
    input_extra: msgspec.Raw = msgspec.Raw(b"")
    content: msgspec.Raw = msgspec.Raw(b"")  # /tokenize
    tokens: msgspec.Raw = msgspec.Raw(b"")  # /detokenize
    query: msgspec.Raw = msgspec.Raw(b"")  # rerank
    documents: msgspec.Raw = msgspec.Raw(b"")
    functions: msgspec.Raw = msgspec.Raw(b"")  # OpenAI's legacy function calling
    function_call: msgspec.Raw = msgspec.Raw(b"")

    def raw(self, name: str) -> bytes:
        return bytes(getattr(self, name))

    def prompt_estimate(self) -> int:
        """Tokens of the prompt, guessed from its JSON size (~4 bytes a token)."""
        size = (
            len(self.messages) + len(self.prompt) + len(self.input) + len(self.system) + len(self.instructions)
            + len(self.input_prefix) + len(self.input_suffix) + len(self.input_extra) + len(self.content)
            + len(self.query) + len(self.documents)
        )  # fmt: skip
        return max(1, size // 4)

    def completion_cap(self) -> int | None:
        """The most tokens it may generate per choice, if it says (0: none, prompt only)."""
        cap = self.max_completion_tokens or self.max_tokens or self.max_output_tokens
        if cap is None and self.n_predict is not None and self.n_predict >= 0:
            return self.n_predict
        return cap


_decoders: dict[type[Envelope], Any] = {}
_generic = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def decode(body: bytes, required: str | None, envelope: type[Envelope] = Envelope) -> Envelope:
    """The envelope of ``body``, or a 400 that names the offending parameter. The model may
    be absent (the pipeline resolves a default); ``required`` may not."""
    if not body:
        raise bad_request("The request body is empty; expected a JSON object.")
    dec = _decoders.get(envelope)
    if dec is None:
        dec = _decoders[envelope] = msgspec.json.Decoder(envelope).decode
    try:
        env: Envelope = dec(body)
    except msgspec.ValidationError as e:
        raise _invalid(str(e)) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if required is not None and not getattr(env, required):
        raise bad_request(f"Missing required parameter: '{required}'.", param=required)
    if env.messages and not bytes(env.messages).lstrip().startswith(b"["):
        raise bad_request("Invalid type for 'messages': expected an array of message objects.", param="messages")
    return env


def _too_deep() -> ApiError:
    return bad_request("The JSON body of your request is nested too deeply.", code="invalid_json")


def _invalid(msg: str) -> ApiError:
    param = msg.split("at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0] if "at `$." in msg else None
    if msg.startswith("Object missing required field"):
        param = msg.split("`")[1]
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if " >= " in msg:
        return bad_request(f"Invalid value for '{param}': {msg.split(' - at ')[0]}.", param=param, code="invalid_value")
    return bad_request(f"Invalid type for '{param}': {msg.split(' - at ')[0]}.", param=param)


def upstream_body(
    body: bytes, env: Envelope, upstream_model: str, usage_option: bool, legacy_functions: bool = False
) -> tuple[bytes, bool]:
    """The bytes to send upstream and whether llmd added include_usage (then it hides the
    usage chunk). The original bytes go out unless something must change: the model name,
    include_usage, or legacy ``functions`` translated to ``tools``."""
    opts = env.stream_options
    hide_usage = usage_option and bool(env.stream) and not (opts and opts.include_usage)
    if env.model == upstream_model and not hide_usage and not legacy_functions:
        return body, False
    if env.model == upstream_model and opts is msgspec.UNSET and not legacy_functions:
        # Cheap and exact: add the field in front, no re-encoding of the rest.
        start = body.index(b"{") + 1
        sep = b"," if body[start:].strip() != b"}" else b""
        return body[:start] + b'"stream_options":{"include_usage":true}' + sep + body[start:], True
    try:
        doc: dict[str, Any] = _generic(body)
    except RecursionError:
        raise _too_deep() from None
    except msgspec.DecodeError as e:
        # The envelope decoder skips the fields it does not read without checking them all
        # (a number like 1e999, invalid UTF-8): only a re-encoded body meets them.
        raise bad_request(f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from None
    doc["model"] = upstream_model
    if legacy_functions:
        functions_to_tools(doc)
    if hide_usage:
        old = doc.get("stream_options")
        doc["stream_options"] = {**(old if isinstance(old, dict) else {}), "include_usage": True}
    return _encode(doc), hide_usage


def functions_to_tools(doc: dict[str, Any]) -> None:
    """OpenAI's legacy ``functions`` / ``function_call`` as ``tools`` / ``tool_choice``, for
    engines that know only tools (the answer is translated back, see legacy.py)."""
    functions = doc.pop("functions", None)
    choice = doc.pop("function_call", None)
    if isinstance(functions, list):
        doc["tools"] = [{"type": "function", "function": f} for f in functions]
    if isinstance(choice, str):
        doc["tool_choice"] = choice  # "auto" | "none"
    elif isinstance(choice, dict) and "name" in choice:
        doc["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
