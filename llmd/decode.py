"""YAML values -> msgspec Structs, collecting every error with its YAML path.

A generic decoder, knowing nothing of llmd's config but the Struct types it is given: it never
stops at the first mistake, so that ``llmd check`` can list them all (``models.qwen.replicas:
must be >= 1, got 0``), like ``nginx -t``. Unknown keys are errors (with a "did you mean"
when only ``-``/``_`` differ). ``${VAR}`` in a string value is replaced from the environment.
"""

from __future__ import annotations

import os
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

T = TypeVar("T", bound=Struct)

# A Struct field with this name is never read from YAML: it records where the document came
# from (``Config.source``), which the document cannot say about itself.
NOT_FROM_YAML = "source"


def decode(raw: Any, cls: type[T], errors: list[str]) -> T | None:
    """``raw`` (what ``yaml.safe_load`` returned; None is an empty mapping) as a ``cls``, or None
    when anything is wrong, each problem appended to ``errors`` as ``yaml.path: what``."""
    return _convert_struct(raw, cls, "", errors)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: str, path: str, errors: list[str]) -> str:
    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        if var not in os.environ:
            errors.append(f"{path}: environment variable {var} is not set")
            return ""
        return os.environ[var]

    return _ENV_RE.sub(sub, value)


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Annotated:
        base, *meta = typing.get_args(t)
        name = _type_name(base)
        for m in meta:
            if isinstance(m, Meta):
                if m.ge is not None:
                    name += f" >= {m.ge}"
                if m.gt is not None:
                    name += f" > {m.gt}"
                if m.le is not None:
                    name += f" <= {m.le}"
        return name
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(t)[1])}"
    if isinstance(t, type) and issubclass(t, Struct):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}.get(
        t, getattr(t, "__name__", str(t))
    )


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _convert(value: Any, t: Any, path: str, errors: list[str]) -> Any:
    """Convert ``value`` to type ``t``; on failure record errors and return None.

    Recurses into Structs, lists and dicts so that one bad field does not hide
    another; leaves are converted by msgspec (which applies Meta constraints).
    """
    origin = typing.get_origin(t)
    if isinstance(value, str) and "${" in value:
        value = _expand_env(value, path, errors)
    if isinstance(t, type) and issubclass(t, Struct):
        return _convert_struct(value, t, path, errors)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        structs = [a for a in args if isinstance(a, type) and issubclass(a, Struct)]
        if len(structs) == 1 and isinstance(value, dict):
            return _convert_struct(value, structs[0], path, errors)
    if origin is list and isinstance(value, list):
        (item_t,) = typing.get_args(t)
        return [_convert(v, item_t, _join(path, i), errors) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        key_t, val_t = typing.get_args(t)
        out = {}
        for k, v in value.items():
            if key_t is int:  # e.g. GPU indexes: YAML gives ints ({0: 20GiB}), quoted ones are strings
                if isinstance(k, str) and k.isascii() and k.isdigit():
                    k = int(k)
                if type(k) is not int:
                    errors.append(f"{_join(path, str(k))}: keys must be integers")
                    continue
            elif not isinstance(k, str):
                errors.append(f"{_join(path, str(k))}: keys must be strings")
                continue
            out[k] = _convert(v, val_t, _join(path, str(k)), errors)
        return out
    try:
        return msgspec.convert(value, t, strict=False)
    except msgspec.ValidationError as e:
        errors.append(f"{path}: {_explain(str(e), t, value)}")
        return None


def _explain(msgspec_message: str, t: Any, value: Any) -> str:
    """Turn msgspec's message into 'expected X, got Y' / 'must be >= 1, got 0'."""
    got = "nothing" if value is None else repr(value)
    m = re.match(r"Expected `[^`]+` ((?:[<>]=?|==) .+?)(?: - at .*)?$", msgspec_message)
    if m:
        return f"must be {m.group(1)}, got {got}"
    return f"expected {_type_name(t)}, got {got}"


def _convert_struct(value: Any, cls: type[Struct], path: str, errors: list[str]) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        errors.append(f"{path or '(top level)'}: expected a mapping, got {type(value).__name__}")
        return None
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls) if f.name != NOT_FROM_YAML}
    kwargs: dict[str, Any] = {}
    ok = True
    for key in value:
        if key not in fields:
            close = [n for n in fields if n.replace("-", "_") == str(key).replace("-", "_")]
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(fields))}"
            errors.append(f"{_join(path, str(key))}: unknown key{hint}")
            ok = False
    for enc, f in fields.items():
        if enc not in value:
            if f.required:
                errors.append(f"{_join(path, enc)}: required, expected {_type_name(hints[f.name])}")
                ok = False
            continue
        before = len(errors)
        converted = _convert(value[enc], hints[f.name], _join(path, enc), errors)
        if len(errors) > before:
            ok = False
        kwargs[f.name] = converted
    if not ok:
        return None
    return cls(**kwargs)
