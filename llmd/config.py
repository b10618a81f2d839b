"""config.yaml: the contract between ops and llmd, decoded into msgspec Structs.

Loading never stops at the first mistake: every error is collected with its YAML
path (``models.qwen.replicas: must be >= 1``) so that ``llmd check`` can list them
all, like ``nginx -t``. Unknown keys are errors. ``${VAR}`` in a string value is
replaced from the environment. Relative paths resolve against the config file's
directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct, field

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]

DEFAULT_PATHS = (Path("config.yaml"), Path("/etc/llm-api/config.yaml"))


class _Section(Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"  # nginx is in front; never 0.0.0.0 by default
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    drain_seconds: NonNegFloat = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    access_log_health: bool = False  # /health, /readyz and /metrics are noise in an access log
    metrics: bool = True
    # Serves requests that name no model (clients written for one llama-server: llama.vscode,
    # llama.vim, /completion scripts); keys[].default_model overrides it per key.
    default_model: str | None = None


class UsageConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True  # false: no ledger (benchmarks; monthly quotas then count from zero at start)
    path: str = "/var/lib/llm-api/usage.sqlite3"
    flush_ms: PositiveInt = 50
    max_pending_rows: PositiveInt = 100_000  # kept in memory while the disk fails; beyond: dropped, counted


class LimitFields(_Section, kw_only=True, forbid_unknown_fields=True):
    """The limit fields shared by a tier and a key's per-key overrides. Absent = unlimited."""

    requests_per_minute: PositiveInt | None = None
    requests_per_hour: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    monthly_tokens: NonNegInt | None = None  # 0 means unlimited, as DESIGN.md says
    max_concurrent: PositiveInt | None = None
    priority: int | None = None
    default_max_tokens: PositiveInt | None = None  # reserved against tokens_per_minute when a request names none


LIMIT_FIELDS = tuple(f.name for f in msgspec.structs.fields(LimitFields))


class TierConfig(LimitFields, kw_only=True, forbid_unknown_fields=True):
    pass


class KeyConfig(LimitFields, kw_only=True, forbid_unknown_fields=True):
    id: str
    tier: str | None = None
    sha256: str | None = None
    secret_env: str | None = None
    secret: str | None = None  # refused by validation; present only to say how to hash it
    models: list[str] | None = None
    admin: bool = False
    revoked: bool = False
    default_model: str | None = None  # for this key's requests without a model


class LauncherConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    command: str | list[str]
    start_timeout_s: PositiveFloat = 300.0
    stop_timeout_s: PositiveFloat = 10.0
    health_interval_s: PositiveFloat = 2.0
    health_failures: PositiveInt = 3  # consecutive failed health checks before a restart
    restart_delay_s: PositiveFloat = 1.0  # first backoff; doubles per failure up to restart_max_delay_s
    restart_max_delay_s: PositiveFloat = 60.0
    env: dict[str, str] = field(default_factory=dict)


def _llama_launcher() -> LauncherConfig:
    return LauncherConfig(command="llama-server", start_timeout_s=300.0)


def _vllm_launcher() -> LauncherConfig:
    return LauncherConfig(
        command=["python3", "-m", "vllm.entrypoints.openai.api_server"],
        start_timeout_s=900.0,
        stop_timeout_s=30.0,
        env={"VLLM_HOST_IP": "127.0.0.1"},
    )


class LaunchersConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    llama_server: LauncherConfig = field(default_factory=_llama_launcher, name="llama-server")
    vllm: LauncherConfig = field(default_factory=_vllm_launcher)


Backend = Literal["llama-server", "vllm", "openai"]
# The names of routes.ROUTES (a test keeps the two equal; config imports nothing of llmd).
RouteName = Literal[
    "chat", "completions", "embeddings", "messages", "count_tokens", "responses", "input_tokens",
    "chat_input_tokens", "infill", "completion", "tokenize", "detokenize", "apply_template", "rerank",
]  # fmt: skip


class ModelConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    backend: Backend
    aliases: list[str] = field(default_factory=list)
    model: str | None = None  # a GGUF file or a model folder; required for supervised backends
    replicas: PositiveInt = 1
    cpus: list[list[NonNegInt]] | None = None
    gpus: list[list[NonNegInt]] | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    upstream_model: str | None = None
    api_key_env: str | None = None
    slots: PositiveInt | None = None
    start_timeout_s: PositiveFloat | None = None  # overrides the launcher's
    routes: list[RouteName] | None = None  # backend openai: what the remote serves (default the OpenAI three)


class TimeoutsConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    connect_s: PositiveFloat = 5.0
    first_byte_s: PositiveFloat = 120.0
    total_s: PositiveFloat = 600.0


class RoutingConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    strategy: Literal["prefix-affinity", "least-loaded", "round-robin"] = "prefix-affinity"
    # fair: tier priority, then least recent service per key; fifo: arrival order (for comparison).
    admission: Literal["fair", "fifo"] = "fair"
    max_queue: NonNegInt = 256
    queue_timeout_s: PositiveFloat = 30.0
    retries: NonNegInt = 2
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    affinity_min_match: Annotated[float, Meta(ge=0, le=1)] = 0.5  # share of the prompt a cached prefix must cover
    load_factor: Annotated[float, Meta(ge=1)] = 1.25  # bounded load: at most this x the mean in-flight
    eject_after_failures: PositiveInt = 3


class Config(_Section, kw_only=True, forbid_unknown_fields=True):
    # Empty is valid (a fresh package install serves nothing until ops add a model).
    models: dict[str, ModelConfig] = field(default_factory=dict)
    server: ServerConfig = field(default_factory=ServerConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    keys: list[KeyConfig] = field(default_factory=list)
    launchers: LaunchersConfig = field(default_factory=LaunchersConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Where it was read from; not part of the YAML.
    source: str = ""

    def model_names(self) -> dict[str, str]:
        """Every name a client may send (names and aliases) -> the model's config name."""
        names = {name: name for name in self.models}
        for name, m in self.models.items():
            for alias in m.aliases:
                names[alias] = name
        return names


class ConfigError(Exception):
    """All the problems of one config file, each naming its YAML path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: {len(errors)} error(s)")
        self.source = source
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {e}" for e in self.errors)


# --- decoding, collecting every error --------------------------------------------------------

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
        _, val_t = typing.get_args(t)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{_join(path, str(k))}: keys must be strings")
                continue
            out[k] = _convert(v, val_t, _join(path, k), errors)
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
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls) if f.name != "source"}
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


# --- semantic checks ---------------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(cfg: Config, errors: list[str]) -> None:
    try:
        ipaddress.ip_address(cfg.server.host)
    except ValueError:
        if cfg.server.host != "localhost":
            errors.append(f"server.host: expected an IP address, got {cfg.server.host!r}")
    if not cfg.keys and not is_loopback_host(cfg.server.host):
        errors.append(
            f"keys: none configured while server.host is {cfg.server.host!r}, which is not loopback: "
            "without keys llmd accepts anyone who reaches it; add keys or bind 127.0.0.1"
        )
    for i, p in enumerate(cfg.server.trusted_proxies):
        try:
            ipaddress.ip_network(p, strict=False)
        except ValueError:
            errors.append(f"server.trusted_proxies[{i}]: expected an IP address or network, got {p!r}")
    for i, o in enumerate(cfg.server.cors_origins):
        if o != "*" and not re.match(r"^https?://[^/]+$", o):
            errors.append(f"server.cors_origins[{i}]: expected an origin like https://host[:port], got {o!r}")

    names = cfg.model_names()
    if cfg.server.default_model is not None and cfg.server.default_model not in names:
        errors.append(f"server.default_model: {cfg.server.default_model!r} is not a model or alias of models:")
    for i, k in enumerate(cfg.keys):
        if k.default_model is not None:
            if k.default_model not in names:
                errors.append(f"keys[{i}].default_model: {k.default_model!r} is not a model or alias of models:")
            elif k.models is not None and k.default_model not in k.models:
                errors.append(f"keys[{i}].default_model: {k.default_model!r} is not in the key's models:")
    seen_names: dict[str, str] = {}
    for name, m in cfg.models.items():
        p = f"models.{name}"
        for n in [name, *m.aliases]:
            if n in seen_names and seen_names[n] != name:
                errors.append(f"{p}: name {n!r} is already used by models.{seen_names[n]}")
            seen_names.setdefault(n, name)
        if m.backend == "openai":
            if not m.urls:
                errors.append(f"{p}.urls: required for backend openai (a list of upstream base URLs)")
            for i, u in enumerate(m.urls):
                if not re.match(r"^https?://", u):
                    errors.append(f"{p}.urls[{i}]: expected an http(s) URL, got {u!r}")
            for fld in ("model", "cpus", "gpus"):
                if getattr(m, fld):
                    errors.append(f"{p}.{fld}: not used by backend openai (llmd does not start it)")
            if m.api_key_env and m.api_key_env not in os.environ:
                errors.append(f"{p}.api_key_env: environment variable {m.api_key_env} is not set")
        else:
            if not m.model:
                errors.append(f"{p}.model: required for backend {m.backend} (path of the model)")
            if m.urls:
                errors.append(f"{p}.urls: only for backend openai; llmd starts {m.backend} itself")
            for fld, sets in (("cpus", m.cpus), ("gpus", m.gpus)):
                if sets is None:
                    continue
                if len(sets) != m.replicas:
                    errors.append(f"{p}.{fld}: expected one set per replica ({m.replicas}), got {len(sets)}")
                for i, s in enumerate(sets):
                    if not s:
                        errors.append(f"{p}.{fld}[{i}]: must not be empty")
            if m.backend == "llama-server" and m.gpus:
                errors.append(f"{p}.gpus: llama-server replicas here run on CPUs; use cpus")
        if m.routes is not None and m.backend != "openai":
            errors.append(f"{p}.routes: only for backend openai; llmd knows what {m.backend} serves")
        if m.slots is not None and m.backend != "openai":
            errors.append(f"{p}.slots: only for backend openai; supervised backends report their own")

    for name, t in cfg.tiers.items():
        if t.priority is None:
            t.priority = 0
        _ = name
    ids: set[str] = set()
    hashes: dict[str, str] = {}
    for i, k in enumerate(cfg.keys):
        p = f"keys[{i}]"
        if not _KEY_ID.match(k.id):
            errors.append(f"{p}.id: expected letters, digits and ._@- (max 64), got {k.id!r}")
        if k.id in ids:
            errors.append(f"{p}.id: duplicate key id {k.id!r}")
        ids.add(k.id)
        if k.tier is not None and k.tier not in cfg.tiers:
            errors.append(f"{p}.tier: unknown tier {k.tier!r}; defined: {', '.join(cfg.tiers) or 'none'}")
        if k.secret is not None:
            errors.append(
                f"{p}.secret: plain secrets are not allowed in config.yaml; store its hash instead: "
                "`printf %s 'SECRET' | sha256sum` -> sha256: <hex>, or `llmd keys new "
                f"{k.id}` for a new one, or secret_env: VAR to read it from the environment"
            )
        given = [f for f in ("sha256", "secret_env") if getattr(k, f)]
        if len(given) != 1 and k.secret is None:
            errors.append(f"{p}: exactly one of sha256 or secret_env is required")
        if k.sha256 is not None:
            h = k.sha256.lower()
            if not _HEX64.match(h):
                errors.append(f"{p}.sha256: expected 64 hex digits (sha256 of the secret)")
            elif h in hashes:
                errors.append(f"{p}.sha256: the same secret as key {hashes[h]!r}")
            else:
                hashes[h] = k.id
            k.sha256 = h
        if k.secret_env is not None and not os.environ.get(k.secret_env):
            errors.append(f"{p}.secret_env: environment variable {k.secret_env} is not set or empty")
        for j, mname in enumerate(k.models or []):
            if mname not in seen_names:
                errors.append(f"{p}.models[{j}]: unknown model {mname!r}")

    for lname in ("llama_server", "vllm"):
        launcher: LauncherConfig = getattr(cfg.launchers, lname)
        if isinstance(launcher.command, list) and not launcher.command:
            errors.append(f"launchers.{lname.replace('_', '-')}.command: must not be empty")


def _resolve_paths(cfg: Config, base: Path) -> None:
    def resolve(p: str) -> str:
        return str((base / p).resolve()) if p and not os.path.isabs(p) else p

    cfg.usage.path = resolve(cfg.usage.path)
    for m in cfg.models.values():
        if m.model and m.backend == "llama-server":
            m.model = resolve(m.model)
        elif m.model and m.backend == "vllm" and (m.model.startswith(".") or "/" in m.model):
            # vLLM also takes hub-style names ("org/model"); only ./relative paths resolve.
            if m.model.startswith("."):
                m.model = resolve(m.model)
    for launcher in (cfg.launchers.llama_server, cfg.launchers.vllm):
        cmd = launcher.command
        if isinstance(cmd, str) and cmd.startswith("."):
            launcher.command = resolve(cmd)
        elif isinstance(cmd, list) and cmd and cmd[0].startswith("."):
            cmd[0] = resolve(cmd[0])


def parse(text: str, source: str = "<string>", base: Path | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}invalid YAML: {getattr(e, 'problem', e)}"]) from None
    errors: list[str] = []
    if raw is None:
        raw = {}
    cfg = _convert_struct(raw, Config, "", errors)
    if cfg is not None:
        _check(cfg, errors)
        from .launchers import validate as validate_launch  # late: launchers imports this module

        errors.extend(validate_launch(cfg))
    if errors or cfg is None:
        raise ConfigError(source, errors or ["invalid config"])
    cfg.source = source
    _resolve_paths(cfg, base or Path.cwd())
    return cfg


def find(path: str | None) -> Path:
    """The file to read: ``-c`` if given, else ./config.yaml, else /etc/llm-api/config.yaml."""
    if path:
        return Path(path)
    for p in DEFAULT_PATHS:
        if p.exists():
            return p
    raise ConfigError("config", [f"no config file given and none of {', '.join(map(str, DEFAULT_PATHS))} exists"])


def load(path: str | Path | None = None) -> Config:
    p = find(str(path) if path else None)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror}"]) from None
    return parse(text, source=str(p), base=p.resolve().parent)


def limits_for(cfg: Config, key: KeyConfig) -> LimitFields:
    """A key's effective limits: its tier's fields, overridden by the key's own."""
    tier = cfg.tiers.get(key.tier or "") or LimitFields()
    merged = {f: getattr(tier, f) for f in LIMIT_FIELDS}
    for f in LIMIT_FIELDS:
        v = getattr(key, f)
        if v is not None:
            merged[f] = v
    if merged["priority"] is None:
        merged["priority"] = 0
    if merged["monthly_tokens"] == 0:
        merged["monthly_tokens"] = None
    return LimitFields(**merged)
