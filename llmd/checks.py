"""Semantic checks of a decoded config: what the Struct types cannot say (names unique across
models and aliases, a key's tier defined, exactly one of ``sha256``/``secret_env``, no flag in
``args`` that llmd sets itself, ...). Every problem is reported with its YAML path; none stops
the others from being found.
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from .budget import EstimateError, capacity, fmt, parse_size, replica_needs
from .config import Config, LauncherConfig, MemoryBudgetConfig
from .launchers import served_routes
from .launchers import validate as validate_launch
from .tools import host_allowed, host_of

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(cfg: Config) -> list[str]:
    """Every problem of a decoded config that its types cannot express, each with its YAML path,
    in the order of the file's sections. Also fills two defaults the checks rely on: a tier's
    ``priority`` (0) and lower-case ``sha256`` hashes."""
    errors: list[str] = []
    _check_server(cfg, errors)
    _check_default_models(cfg, errors)
    names = _check_models(cfg, errors)
    _check_demand(cfg, errors)
    for t in cfg.tiers.values():
        if t.priority is None:
            t.priority = 0
    _check_keys(cfg, names, errors)
    _check_launchers(cfg, errors)
    _check_tools(cfg, errors)
    _check_rag(cfg, errors)
    _check_stores(cfg, errors)
    errors.extend(validate_launch(cfg))
    return errors


def _check_server(cfg: Config, errors: list[str]) -> None:
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


def _check_default_models(cfg: Config, errors: list[str]) -> None:
    """``server.default_model`` and ``keys[].default_model`` name a model the key may use."""
    names = cfg.model_names()
    if cfg.server.default_model is not None and cfg.server.default_model not in names:
        errors.append(f"server.default_model: {cfg.server.default_model!r} is not a model or alias of models:")
    for i, k in enumerate(cfg.keys):
        if k.default_model is not None:
            if k.default_model not in names:
                errors.append(f"keys[{i}].default_model: {k.default_model!r} is not a model or alias of models:")
            elif k.models is not None and k.default_model not in k.models:
                errors.append(f"keys[{i}].default_model: {k.default_model!r} is not in the key's models:")


def _check_models(cfg: Config, errors: list[str]) -> dict[str, str]:
    """Checks ``models``; returns every name a client may send (names, aliases) -> model."""
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
                if len(sets) != m.replica_slots:
                    n = f"max_replicas {m.replica_slots}" if m.on_demand else str(m.replicas)
                    errors.append(f"{p}.{fld}: expected one set per replica ({n}), got {len(sets)}")
                for i, s in enumerate(sets):
                    if not s:
                        errors.append(f"{p}.{fld}[{i}]: must not be empty")
            if m.backend == "llama-server" and m.gpus:
                errors.append(f"{p}.gpus: llama-server replicas here run on CPUs; use cpus")
        if m.routes is not None and m.backend != "openai":
            errors.append(f"{p}.routes: only for backend openai; llmd knows what {m.backend} serves")
        if m.slots is not None and m.backend != "openai":
            errors.append(f"{p}.slots: only for backend openai; supervised backends report their own")
    return seen_names


def _check_demand(cfg: Config, errors: list[str]) -> None:
    """load: on_demand settings and the memory budget (budget.py)."""
    cap: dict[str, int] = {}
    fixed: dict[str, int] = {}  # held by load: always models
    # DESIGN.md's contract names (memory_budget_mb, memory_mb) are the plain-MiB forms of
    # memory_budget.ram and memory: one of each pair, filled into the other here.
    if cfg.server.memory_budget_mb is not None:
        if cfg.server.memory_budget is not None and cfg.server.memory_budget.ram is not None:
            errors.append("server.memory_budget_mb: give either memory_budget_mb or memory_budget.ram")
        else:
            mb0 = cfg.server.memory_budget or MemoryBudgetConfig()
            mb0.ram = cfg.server.memory_budget_mb << 20
            cfg.server.memory_budget = mb0
    for name, m in cfg.models.items():
        if m.memory_mb is not None:
            if m.memory is not None:
                errors.append(f"models.{name}.memory_mb: give either memory_mb or memory")
            else:
                m.memory = m.memory_mb << 20
    mb = cfg.server.memory_budget
    if mb is not None:
        for path, size in [("ram", mb.ram), *((f"vram.{g}", v) for g, v in mb.vram.items())]:
            if size is None:
                continue
            try:
                parse_size(size)
            except ValueError as e:
                errors.append(f"server.memory_budget.{path}: {e}")
        try:
            cap = capacity(mb)
        except ValueError:
            cap = {}
    for name, m in cfg.models.items():
        p = f"models.{name}"
        if m.memory is not None:
            try:
                parse_size(m.memory)
            except ValueError as e:
                errors.append(f"{p}.memory: {e}")
                continue
        if m.backend == "openai":
            if m.on_demand:
                errors.append(f"{p}.load: on_demand is for models llmd starts; backend openai is not started")
            continue
        if m.on_demand and m.max_replicas is not None and m.min_replicas > m.max_replicas:
            errors.append(f"{p}.min_replicas: {m.min_replicas} is more than max_replicas ({m.max_replicas})")
        if not m.on_demand:
            for fld in ("min_replicas", "max_replicas", "preload", "pin"):
                if getattr(m, fld):
                    errors.append(f"{p}.{fld}: only for load: on_demand (a load: always model always runs)")
        if cap and m.model:
            for index in range(m.replica_slots):
                try:
                    for r, n in replica_needs(m, index, cap).items():
                        if not m.on_demand:
                            fixed[r] = fixed.get(r, 0) + n
                except EstimateError as e:
                    errors.append(f"{p}.memory: {e}")
                    break
    for r, n in fixed.items():
        if n > cap[r]:
            errors.append(
                f"server.memory_budget: the load: always models alone need {fmt(n)} of {r}, "
                f"more than its {fmt(cap[r])}; raise it or make some of them load: on_demand"
            )


def _check_keys(cfg: Config, seen_names: dict[str, str], errors: list[str]) -> None:
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


def _check_launchers(cfg: Config, errors: list[str]) -> None:
    for lname in ("llama_server", "vllm"):
        launcher: LauncherConfig = getattr(cfg.launchers, lname)
        if isinstance(launcher.command, list) and not launcher.command:
            errors.append(f"launchers.{lname.replace('_', '-')}.command: must not be empty")


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_tools(cfg: Config, errors: list[str]) -> None:
    """A tool is a built-in or an url on an allowed host, usable by tiers and keys that exist."""
    key_ids = {k.id for k in cfg.keys}
    for name, t in cfg.tools.items():
        p = f"tools.{name}"
        if not _TOOL_NAME.match(name):
            errors.append(f"{p}: a tool name is letters, digits and ._- (max 64)")
        if (t.builtin is None) == (t.url is None):
            errors.append(f"{p}: exactly one of builtin or url is required")
        if t.url is not None:
            if not re.match(r"^https?://[^/]+", t.url):
                errors.append(f"{p}.url: expected an http(s) URL, got {t.url!r}")
            elif not host_allowed(t.url, cfg.tool_loop.allowed_hosts):
                errors.append(
                    f"{p}.url: host {host_of(t.url)[1]} is not in tool_loop.allowed_hosts "
                    f"({', '.join(cfg.tool_loop.allowed_hosts) or 'empty'})"
                )
            if t.parameters is None:
                errors.append(f"{p}.parameters: required for an HTTP tool (the JSON schema of its arguments)")
        elif t.parameters is not None or t.headers_env:
            errors.append(f"{p}: a built-in has its own parameters and no headers")
        if t.parameters is not None and t.parameters.get("type") != "object":
            errors.append(f"{p}.parameters: expected a JSON schema of type object")
        for h, env in t.headers_env.items():
            if env not in os.environ:
                errors.append(f"{p}.headers_env.{h}: environment variable {env} is not set")
        for i, tier in enumerate(t.tiers):
            if tier not in cfg.tiers:
                errors.append(f"{p}.tiers[{i}]: unknown tier {tier!r}")
        for i, k in enumerate(t.keys):
            if k not in key_ids:
                errors.append(f"{p}.keys[{i}]: unknown key id {k!r}")
    holders = [(f"tiers.{n}", n, None, t.default_tools) for n, t in cfg.tiers.items()]
    holders += [(f"keys[{i}]", k.tier, k.id, k.default_tools) for i, k in enumerate(cfg.keys)]
    for p, tier, key_id, names in holders:
        for i, name in enumerate(names or ()):
            tool = cfg.tools.get(name)
            if tool is None:
                errors.append(f"{p}.default_tools[{i}]: unknown tool {name!r} (not in tools:)")
            elif (tool.tiers or tool.keys) and not (
                (tier is not None and tier in tool.tiers) or (key_id is not None and key_id in tool.keys)
            ):
                who = f"key {key_id!r}" if key_id is not None else f"tier {tier!r}"
                errors.append(f"{p}.default_tools[{i}]: tool {name!r} is not allowed for {who}")


_COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _check_rag(cfg: Config, errors: list[str]) -> None:
    """A collection names models that serve its routes, tiers and keys that exist, a chunk
    its overlap fits in, and a Qdrant it can reach."""
    names = cfg.model_names()
    key_ids = {k.id for k in cfg.keys}
    for name, c in cfg.rag.collections.items():
        p = f"rag.collections.{name}"
        if not _COLLECTION.match(name):
            errors.append(f"{p}: a collection name is letters, digits, _ and - (max 64)")
        for fld, route in (("embedding_model", "embeddings"), ("chat_model", "chat")):
            model = getattr(c, fld)
            if model is None:
                continue
            if model not in names:
                errors.append(f"{p}.{fld}: {model!r} is not a model or alias of models:")
            elif route not in served_routes(cfg.models[names[model]]):
                errors.append(f"{p}.{fld}: model {model!r} does not serve {route}")
        if c.chunk.overlap >= c.chunk.tokens:
            errors.append(f"{p}.chunk.overlap: must be less than chunk.tokens ({c.chunk.tokens})")
        if c.top_k > c.max_top_k:
            errors.append(f"{p}.top_k: must be at most max_top_k ({c.max_top_k})")
        if c.store == "sqlite" and (c.url_env or c.qdrant_path):
            errors.append(f"{p}: url_env and qdrant_path are for store: qdrant")
        if c.url_env and c.url_env not in os.environ:
            errors.append(f"{p}.url_env: environment variable {c.url_env} is not set")
        for i, tier in enumerate(c.tiers):
            if tier not in cfg.tiers:
                errors.append(f"{p}.tiers[{i}]: unknown tier {tier!r}")
        for i, k in enumerate(c.keys):
            if k not in key_ids:
                errors.append(f"{p}.keys[{i}]: unknown key id {k!r}")


def _check_stores(cfg: Config, errors: list[str]) -> None:
    """The shared stores' secrets come from the environment: a missing one is a config error
    here, not a crash at start. (``llmd check`` also connects to them: cli.py.)"""
    u, lim = cfg.usage, cfg.limits
    if u.dsn and urlsplit(u.dsn).password:
        errors.append(
            "usage.dsn: holds a password; put it in PGPASSWORD (or the whole DSN in usage.dsn_env's variable)"
        )
    if u.store == "postgres":
        dsn, where = (
            (os.environ.get(u.dsn_env, ""), f"usage.dsn_env: {u.dsn_env}")
            if os.environ.get(u.dsn_env)
            else (u.dsn, "usage.dsn")
        )
        if not dsn:
            errors.append(f"usage.dsn: empty, and environment variable {u.dsn_env} (usage.dsn_env) is not set either")
        elif not dsn.startswith(("postgres://", "postgresql://")):
            errors.append(f"{where} must be a postgresql:// URL")
        if not u.enabled:
            errors.append("usage.store: postgres needs usage.enabled: true")
    if lim.store == "redis":
        url = os.environ.get(lim.url_env, "")
        if not url:
            errors.append(f"limits.url_env: environment variable {lim.url_env} is not set or empty (store: redis)")
        elif not url.startswith(("redis://", "unix://")):
            # No TLS (rediss://): reach a remote Redis over a private network or a tunnel.
            errors.append(f"limits.url_env: {lim.url_env} must hold a redis:// or unix:// URL")
