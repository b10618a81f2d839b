"""NativeMeter: usage from llama.cpp's own answer shape (``/completion``, ``/infill``):
``tokens_evaluated`` / ``tokens_predicted`` on the answer and, cumulatively, on every stream
event. One of the meters a route declares (meter.py has the protocol and the others)."""

from __future__ import annotations

import msgspec

from .exchange import Exchange
from .outcome import Outcome


class _NativeTimings(msgspec.Struct):
    cache_n: int | None = None


class _Native(msgspec.Struct):
    content: str | None = None
    tokens_evaluated: int | None = None  # the whole prompt, cached part included
    tokens_predicted: int | None = None
    tokens_cached: int | None = None
    stop: bool | None = None
    timings: _NativeTimings | None = None
    error: msgspec.Raw = msgspec.Raw(b"")
    # A ``response_fields`` filter (llama.vscode, llama.vim) flattens the paths it keeps.
    flat_predicted_n: int | None = msgspec.field(default=None, name="timings/predicted_n")


_decode_native = msgspec.json.Decoder(_Native | list[_Native]).decode  # n_cmpl > 1: a list


class NativeMeter:
    """llama.cpp's own shape: ``tokens_evaluated`` / ``tokens_predicted`` on the answer and,
    cumulatively, on every stream event (a ``response_fields`` filter may drop them: then
    the content is counted)."""

    def whole(self, data: bytes, ex: Exchange) -> None:
        try:
            doc = _decode_native(data)
        except msgspec.DecodeError:
            return
        answers = doc if isinstance(doc, list) else [doc]
        prompt = completion = cached = 0
        known = bool(answers)
        for r in answers:
            one = Exchange(t_start=ex.t_start)
            self._take(r, one)
            known = known and one.usage_seen
            # n_cmpl completions share one prompt; each generates its own tokens.
            prompt, cached = max(prompt, one.prompt_tokens), max(cached, one.cached_tokens)
            if one.usage_seen:
                completion += one.completion_tokens
            elif r.flat_predicted_n is not None:
                # A response_fields filter kept timings/predicted_n: exact for the output; the
                # prompt (timings/prompt_n is only its uncached part) is tokenized by the pipeline.
                completion += r.flat_predicted_n
            else:
                completion += (len(r.content or "") + 3) // 4
        if known:
            ex.take_usage(prompt, completion, cached)
        else:
            ex.completion_tokens = completion

    def event(self, payload: bytes, ex: Exchange, hide_usage: bool) -> bool:
        try:
            r = _decode_native(payload)
        except msgspec.DecodeError:
            return True
        if isinstance(r, list):
            return True
        if r.error:
            ex.outcome = Outcome.UPSTREAM_ERROR
        if r.stop:
            ex.finished = True
        if r.content:
            ex.token_relayed()
        self._take(r, ex)
        return True

    @staticmethod
    def _take(r: _Native, ex: Exchange) -> None:
        cached = r.timings.cache_n if r.timings and r.timings.cache_n is not None else r.tokens_cached
        if r.tokens_evaluated is not None and r.tokens_predicted is not None:
            ex.take_usage(r.tokens_evaluated, r.tokens_predicted, cached)
        elif r.tokens_evaluated is not None:
            ex.take_prompt(r.tokens_evaluated, cached)


NATIVE = NativeMeter()
