"""Tools: the server-side tools of config ``tools:`` that a chat request may hand to the model
(the loop that runs them is toolloop.py).

A tool is a name, a description, a JSON schema of its arguments and a way to run: a built-in
(``time.now``, ``time.convert``, ``math.eval``) or an HTTP endpoint. Running one never raises:
whatever goes wrong (arguments that fail the schema, a timeout, a refused host, an HTTP error)
is a ``ToolResult`` with ``ok=False`` whose text the model reads as the tool's answer, because
the model, not the client, is the one who can react to it.

Who may use a tool is config (``tiers``/``keys``); where an HTTP tool may go is
``tool_loop.allowed_hosts``, checked at load (checks.py) and again at every call, and redirects
are never followed, so a tool cannot be talked into another host.
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import msgspec

from .config import Config, ToolConfig

if TYPE_CHECKING:
    from .auth import Principal

_encode = msgspec.json.Encoder().encode
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class ToolResult:
    ok: bool
    text: str  # what the model reads in the tool message (JSON)


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    cfg: ToolConfig

    def allowed(self, p: Principal) -> bool:
        """Every key when the tool names no tiers and no keys; else its tiers' and keys' own."""
        if not self.cfg.tiers and not self.cfg.keys:
            return True
        return p.tier in self.cfg.tiers or p.key_id in self.cfg.keys

    @property
    def wire_name(self) -> str:
        """The function name the model sees: OpenAI allows only ``[A-Za-z0-9_-]`` there, so
        ``time.now`` is ``time_now`` (the loop maps the model's calls back)."""
        return _UNSAFE.sub("_", self.name)

    def function(self) -> dict[str, Any]:
        """As the model sees it: an OpenAI function tool."""
        return {
            "type": "function",
            "function": {"name": self.wire_name, "description": self.description, "parameters": self.parameters},
        }

    def public(self) -> dict[str, Any]:
        """As ``GET /v1/tools`` lists it (never the url nor its headers)."""
        return {
            "name": self.name,
            "function_name": self.wire_name,  # what the model calls it
            "type": "builtin" if self.cfg.builtin else "http",
            "description": self.description,
            "parameters": self.parameters,
        }


# --- the JSON schema subset arguments are checked against ----------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(schema: Any, value: Any, path: str = "$") -> list[str]:
    """What is wrong with ``value`` under ``schema``: type (one or a list), properties,
    required, additionalProperties (false or a schema), items, enum, const, minimum/maximum,
    minLength/maxLength, minItems/maxItems. Other keywords are not checked (the tool's own
    validation still applies); an empty list means valid."""
    if not isinstance(schema, dict):
        return []
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return [f"{path}: expected {' or '.join(map(str, kinds))}, got {_json_type(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: expected one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: must be <= {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors.extend(validate(schema.get("items"), item, f"{path}[{i}]"))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or ():
            if name not in value:
                errors.append(f"{path}: missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, v in value.items():
            if name in props:
                errors.extend(validate(props[name], v, f"{path}.{name}"))
            elif extra is False:
                errors.append(f"{path}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                errors.extend(validate(extra, v, f"{path}.{name}"))
    return errors


def _json_type(v: Any) -> str:
    for name, test in _TYPES.items():
        if name != "number" and test(v):
            return name
    return "number"


# --- math.eval: arithmetic on an AST allow-list ---------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000  # 2 ** 1000 is fine; 9 ** 9 ** 9 is a denial of service
MAX_INT_BITS = 4096  # no intermediate integer beyond this: multiplication chains cannot blow up either
MAX_DEPTH = 50

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "min": min,
    "max": max,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


class MathError(ValueError):
    pass


def math_eval(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses, the
    functions of ``_FUNCTIONS`` and ``pi``/``e``. Nothing else parses into something that runs:
    no names, attributes, subscripts, comprehensions or calls beyond the allow-list; exponents
    and integer sizes are bounded so no input makes it work for long."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise MathError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise MathError("not an arithmetic expression") from None
    try:
        value = _eval(tree.body, 0)
        if isinstance(value, float) and not math.isfinite(value):
            # JSON has no inf/nan: the result would reach the model as null, a number it never got
            raise MathError("result too large" if math.isinf(value) else "result is not a number")
        return value
    except ZeroDivisionError:
        raise MathError("division by zero") from None
    except OverflowError:
        raise MathError("result too large") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, MathError):
            raise
        raise MathError(str(e)) from None


def _eval(node: ast.AST, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise MathError("expression nested too deeply")
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return _bounded(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise MathError(f"exponent beyond {MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if left.bit_length() * right > MAX_INT_BITS:
                    raise MathError("result too large")
        return _bounded(_BINARY[type(node.op)](left, right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and len(node.args) <= 4
    ):
        args = [_eval(a, depth + 1) for a in node.args]
        return _bounded(_FUNCTIONS[node.func.id](*args))
    if isinstance(node, ast.Name | ast.Call):
        name = node.id if isinstance(node, ast.Name) else getattr(node.func, "id", None) or "that call"
        raise MathError(f"{name!s} is not allowed (known: {', '.join([*_FUNCTIONS, *_CONSTANTS])})")
    raise MathError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _bounded(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
        raise MathError("result too large")
    if isinstance(v, complex):
        raise MathError("complex result")
    return v


# --- the built-ins -------------------------------------------------------------------------------------

_TZ = {"type": "string", "description": "IANA time zone, e.g. Europe/Paris (default UTC)"}
BUILTINS: dict[str, tuple[str, dict[str, Any]]] = {
    "time.now": (
        "The current date and time (ISO 8601) in a time zone.",
        {"type": "object", "properties": {"timezone": _TZ}, "additionalProperties": False},
    ),
    "time.convert": (
        "Convert an ISO 8601 date-time from one time zone to another.",
        {
            "type": "object",
            "properties": {
                "time": {"type": "string", "description": "ISO 8601 date-time, e.g. 2025-01-31T09:30"},
                "from_timezone": _TZ,
                "to_timezone": _TZ,
            },
            "required": ["time", "to_timezone"],
            "additionalProperties": False,
        },
    ),
    "math.eval": (
        "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, "
        "sqrt abs round floor ceil log log10 exp sin cos tan min max, pi, e.",
        {
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION_CHARS}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    ),
}


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _run_builtin(name: str, args: dict[str, Any]) -> Any:
    if name == "time.now":
        tz = _zone(args.get("timezone"))
        now = datetime.now(tz)
        return {"time": now.isoformat(timespec="seconds"), "timezone": str(tz), "unix": int(time.time())}
    if name == "time.convert":
        src, dst = _zone(args.get("from_timezone")), _zone(args.get("to_timezone"))
        try:
            t = datetime.fromisoformat(args["time"])
        except ValueError:
            raise ValueError(f"not an ISO 8601 date-time: {args['time']!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=src)
        return {"time": t.astimezone(dst).isoformat(timespec="seconds"), "timezone": str(dst)}
    if name == "math.eval":
        return {"result": math_eval(args["expression"])}
    raise ValueError(f"unknown built-in {name!r}")


# --- the toolbox ---------------------------------------------------------------------------------------


def host_of(url: str) -> tuple[str, str]:
    """(host, host:port) of a url, lower-case, the port explicit (80/443 by scheme)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host, f"{host}:{port}"


def host_allowed(url: str, allowed: list[str]) -> bool:
    host, host_port = host_of(url)
    names = {a.lower() for a in allowed}
    return bool(host) and (host in names or host_port in names)


class Toolbox:
    """The tools of one config (a Runtime's): lookup, who may use them, running them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tools: dict[str, Tool] = {}
        for name, t in cfg.tools.items():
            desc, params = BUILTINS.get(t.builtin or "", ("", {"type": "object"}))
            self.tools[name] = Tool(name, t.description or desc, t.parameters or params, t)

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def for_principal(self, p: Principal) -> list[Tool]:
        return [t for t in self.tools.values() if t.allowed(p)]

    async def run(self, tool: Tool, arguments: str, session: aiohttp.ClientSession) -> ToolResult:
        """Run ``tool`` on the model's arguments (a JSON text). Never raises but on
        cancellation: every failure is the tool's error, for the model to read."""
        try:
            args = msgspec.json.decode(arguments or "{}")
        except (msgspec.DecodeError, RecursionError):  # the model's text: thousands of nested [ too
            return _error("arguments are not valid JSON")
        problems = validate(tool.parameters, args)
        if problems:  # not run: the model gets to try again with what the schema says
            return _error("arguments do not match the tool's schema: " + "; ".join(problems[:5]))
        cfg = tool.cfg
        try:
            if cfg.builtin:
                return ToolResult(True, _encode(_run_builtin(cfg.builtin, args)).decode())
            return await self._http(tool, args, session)
        except (ValueError, TypeError, KeyError, OverflowError) as e:  # e.g. year 9999 + 14 h: out of range
            return _error(str(e))

    async def _http(self, tool: Tool, args: Any, session: aiohttp.ClientSession) -> ToolResult:
        cfg = tool.cfg
        url = cfg.url or ""
        if not host_allowed(url, self.cfg.tool_loop.allowed_hosts):
            # checks.py refuses such a config; this is the second lock (a config built in code).
            return _error(f"host {host_of(url)[1]} is not in tool_loop.allowed_hosts")
        headers = {h: os.environ.get(env, "") for h, env in cfg.headers_env.items()}
        limit = self.cfg.tool_loop.max_result_bytes
        kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": False}
        if cfg.method == "GET":
            if not isinstance(args, dict):
                return _error("a GET tool's arguments must be an object")
            kwargs["params"] = {k: v if isinstance(v, str) else _encode(v).decode() for k, v in args.items()}
        else:
            kwargs["json"] = args
        try:
            async with asyncio.timeout(cfg.timeout_s):
                async with session.request(cfg.method, url, **kwargs) as r:
                    # read(n) returns what has arrived (up to n): loop, or a result that
                    # comes in several segments or chunks is cut after the first.
                    body = b""
                    while len(body) <= limit and (chunk := await r.content.read(limit + 1 - len(body))):
                        body += chunk
                    status = r.status
        except TimeoutError:
            return _error(f"timed out after {cfg.timeout_s:g}s")
        except (aiohttp.ClientError, OSError) as e:
            return _error(f"could not reach the tool: {type(e).__name__}")
        text = body[:limit].decode(errors="replace")
        if len(body) > limit:
            text += " [cut at tool_loop.max_result_bytes]"
        if not 200 <= status < 300:
            return _error(f"HTTP {status}: {text[:500]}")
        return ToolResult(True, text)


def _error(message: str) -> ToolResult:
    return ToolResult(False, _encode({"error": message}).decode())
