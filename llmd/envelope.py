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


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class Envelope(msgspec.Struct):
    """The OpenAI request fields llmd reads (chat, completions, embeddings)."""

    model: str
    stream: bool | None = False
    # >= 1: they size the token reservation, so a negative one would switch the limits off.
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    n: Positive | None = None
    # UNSET (absent) differs from None (``"stream_options": null``): only when absent may
    # llmd add the field by inserting bytes; a present one is re-encoded (JSON parsers keep
    # the last duplicate key, so an inserted field in front of a null would be overridden).
    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET
    # Raw: kept as bytes, never decoded (an empty Raw means absent; Raw | None is not a msgspec type).
    messages: msgspec.Raw = msgspec.Raw(b"")
    prompt: msgspec.Raw = msgspec.Raw(b"")
    input: msgspec.Raw = msgspec.Raw(b"")

    def raw(self, name: str) -> bytes:
        return bytes(getattr(self, name))

    def prompt_estimate(self) -> int:
        """Tokens of the prompt, guessed from its JSON size (~4 bytes a token)."""
        return max(1, len(self.messages or self.prompt or self.input) // 4)

    def completion_cap(self) -> int | None:
        """The most tokens it may generate per choice, if it says."""
        return self.max_completion_tokens or self.max_tokens


_decoders: dict[type[Envelope], Any] = {}
_generic = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def decode(body: bytes, required: str, envelope: type[Envelope] = Envelope) -> Envelope:
    """The envelope of ``body``, or a 400 that names the offending parameter."""
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
    if not getattr(env, required):
        raise bad_request(f"Missing required parameter: '{required}'.", param=required)
    if required == "messages" and not bytes(env.messages).lstrip().startswith(b"["):
        raise bad_request("Invalid type for 'messages': expected an array of message objects.", param="messages")
    if not env.model:
        raise bad_request("Missing required parameter: 'model'.", param="model")
    return env


def _invalid(msg: str) -> ApiError:
    param = msg.split("at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0] if "at `$." in msg else None
    if msg.startswith("Object missing required field"):
        param = msg.split("`")[1]
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if " >= " in msg:
        return bad_request(f"Invalid value for '{param}': {msg.split(' - at ')[0]}.", param=param, code="invalid_value")
    return bad_request(f"Invalid type for '{param}': {msg.split(' - at ')[0]}.", param=param)


def upstream_body(body: bytes, env: Envelope, upstream_model: str, usage_option: bool) -> tuple[bytes, bool]:
    """The bytes to send upstream and whether llmd added include_usage (then it hides the
    usage chunk). The original bytes go out unless something must change."""
    opts = env.stream_options
    hide_usage = usage_option and bool(env.stream) and not (opts and opts.include_usage)
    if env.model == upstream_model and not hide_usage:
        return body, False
    if env.model == upstream_model and opts is msgspec.UNSET:
        # Cheap and exact: add the field in front, no re-encoding of the rest.
        start = body.index(b"{") + 1
        sep = b"," if body[start:].strip() != b"}" else b""
        return body[:start] + b'"stream_options":{"include_usage":true}' + sep + body[start:], True
    try:
        doc: dict[str, Any] = _generic(body)
    except msgspec.DecodeError as e:
        # The envelope decoder skips the fields it does not read without checking them all
        # (a number like 1e999, invalid UTF-8): only a re-encoded body meets them.
        raise bad_request(f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from None
    doc["model"] = upstream_model
    if hide_usage:
        old = doc.get("stream_options")
        doc["stream_options"] = {**(old if isinstance(old, dict) else {}), "include_usage": True}
    return _encode(doc), hide_usage
