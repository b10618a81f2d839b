"""config.yaml: the contract between ops and llmd, as msgspec Structs.

This module is the bottom of the package: it imports nothing of llmd, so every other module
may import it. Reading a file is ``configfile.load`` (YAML -> ``decode`` -> ``checks`` ->
paths resolved); a ``Config`` built in code (tests, benchmarks) skips all of that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]

DEFAULT_PATHS = (Path("config.yaml"), Path("/etc/llm-api/config.yaml"))


class _Section(Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# A size: bytes as an integer, or a string such as "6GiB", "1.5G", "900MB", "512MiB".
Size = int | str


class MemoryBudgetConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    """Memory supervised replicas may hold at once. A replica with a ``gpus`` set counts against
    the VRAM of each of its GPUs (its estimate split evenly), one without against ``ram``.
    A resource without a figure is not limited."""

    ram: Size | None = None
    vram: dict[int, Size] = field(default_factory=dict)  # GPU index -> size


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
    # What supervised replicas may hold at once (budget.py); absent: no limit.
    memory_budget: MemoryBudgetConfig | None = None
    memory_budget_mb: PositiveInt | None = None  # DESIGN.md's name: the same as memory_budget: {ram: N MiB}


class UsageConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True  # false: no ledger (benchmarks; monthly quotas then count from zero at start)
    path: str = "/var/lib/llm-api/usage.sqlite3"
    flush_ms: PositiveInt = 50
    max_pending_rows: PositiveInt = 100_000  # kept in memory while the disk fails; beyond: dropped, counted
    # sqlite: the file at ``path`` (one host). postgres: one database shared by several hosts
    # (pgledger.py), named by ``dsn`` without its password (then from PGPASSWORD or ~/.pgpass,
    # libpq's rules) or, whole, by the environment variable ``dsn_env`` (wins when set).
    store: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str = ""
    dsn_env: str = "LLMD_PG_DSN"
    # What the ``instance`` column of this host's rows says; "" = the host name.
    instance: str = ""


class LimitsConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    """Where per-key limit state lives (limits.py; redislimits.py for redis)."""

    # memory: in this process (one host). redis: shared by every llmd that names the same Redis
    # (or Valkey), so N hosts hold one key to its limits together.
    store: Literal["memory", "redis"] = "memory"
    url_env: str = "LLMD_REDIS_URL"  # the variable holding the redis:// URL (it may carry a password)
    prefix: str = "llmd:"  # of every Redis key llmd writes, so one Redis can serve several clusters
    # Redis unreachable: fail_closed answers 503 (no request goes unlimited); local falls back to
    # this process's own limits until Redis answers again (each host then allows the full limit).
    on_store_error: Literal["fail_closed", "local"] = "fail_closed"
    lease_s: Annotated[float, Meta(ge=1, le=600)] = 15.0  # a killed llmd's concurrency slots free within this
    timeout_ms: PositiveInt = 1000  # a connect or round trip beyond this counts as the store failing


class LimitFields(_Section, kw_only=True, forbid_unknown_fields=True):
    """The limit fields shared by a tier and a key's per-key overrides. Absent = unlimited."""

    requests_per_minute: PositiveInt | None = None
    requests_per_hour: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    monthly_tokens: NonNegInt | None = None  # 0 means unlimited, as DESIGN.md says
    max_concurrent: PositiveInt | None = None
    priority: int | None = None
    default_max_tokens: PositiveInt | None = None  # reserved against tokens_per_minute when a request names none
    # An answer from the completion cache costs the model nothing: by default it counts as a
    # request (request windows, concurrency) but its tokens count against neither
    # tokens_per_minute nor monthly_tokens. Absent = those defaults (see limits_for).
    cache_hit_requests: bool | None = None
    cache_hit_tokens: bool | None = None
    # Server tools (config ``tools:``) added to every chat request of the tier or key that names
    # none itself and does not say ``tool_choice: "none"``: llmd runs the loop (toolloop.py).
    default_tools: list[str] | None = None


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
    cache: bool = False  # deterministic answers of this model may come from the completion cache
    # quiet: the child's routine per-request lines (slot progress, timings, access lines) are
    # logged at DEBUG, its warnings and errors at their level; verbose: routine lines at INFO.
    child_log: Literal["quiet", "verbose"] = "quiet"
    # Models on demand (loader.py). always: every replica runs from start to stop. on_demand:
    # a replica starts when a request arrives for the cold model, stops after idle_ttl_s.
    load: Literal["always", "on_demand"] = "always"
    idle_ttl_s: PositiveFloat = 600.0
    min_replicas: NonNegInt = 0  # on_demand: kept running (started at start, never stopped idle)
    max_replicas: PositiveInt | None = None  # on_demand: scale up to this many (default: replicas)
    preload: bool = False  # on_demand: start one replica at start (then idle_ttl_s applies)
    pin: bool = False  # on_demand: start one at start and never stop it for idleness or memory
    # Scale up when the queue wait p50 over scale_window_s exceeds scale_up_wait_s; a replica
    # beyond the first stops after scale_down_idle_s without requests.
    scale_up_wait_s: PositiveFloat = 1.0
    scale_window_s: PositiveFloat = 30.0
    scale_down_idle_s: PositiveFloat = 60.0
    memory: Size | None = None  # this model's estimate per replica (default: GGUF size + KV cache)
    memory_mb: PositiveInt | None = None  # DESIGN.md's name: the same as memory: "N MiB"

    @property
    def on_demand(self) -> bool:
        return self.load == "on_demand"

    @property
    def replica_slots(self) -> int:
        """How many replica indexes the model may use: max_replicas for on_demand."""
        if self.on_demand:
            return max(self.max_replicas or self.replicas, self.min_replicas, 1)
        return self.replicas


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


class CacheConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    """The completion cache (cache.py), used by the models with ``cache: true``."""

    store: Literal["memory", "sqlite"] = "memory"  # sqlite: also written to a file, reloaded at start
    path: str | None = None  # sqlite: default cache.sqlite3 beside usage.path
    ttl_s: PositiveFloat = 600.0
    max_bytes: PositiveInt = 256 * 1024 * 1024
    max_entries: PositiveInt | None = None
    # Whose entries may answer a request: the same key's (key), any key of the same tier (tier),
    # anyone's (shared). A cached answer may carry what a prompt disclosed, so key is the default.
    scope: Literal["key", "tier", "shared"] = "key"


BuiltinTool = Literal["time.now", "time.convert", "math.eval"]


class ToolConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    """One server-side tool (tools.py): a built-in, or an HTTP endpoint llmd calls with the
    model's arguments. Exactly one of ``builtin`` and ``url`` (checks.py)."""

    builtin: BuiltinTool | None = None
    url: str | None = None
    method: Literal["GET", "POST"] = "POST"  # POST: the arguments as a JSON body; GET: as the query
    description: str = ""  # shown to the model; a built-in has its own when empty
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments (an HTTP tool's is required)
    headers_env: dict[str, str] = field(default_factory=dict)  # header -> environment variable holding its value
    timeout_s: PositiveFloat = 5.0
    # Who may use it: every key when both are empty; else a key whose tier is in tiers or whose
    # id is in keys.
    tiers: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


class ToolLoopConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    """How llmd runs a chat request that names server tools (toolloop.py)."""

    max_rounds: PositiveInt = 4  # model calls per request; the last one is asked for text (tool_choice none)
    # The only hosts (host or host:port) an HTTP tool's url may name; the url is checked against
    # it at load and at every call, and redirects are not followed.
    allowed_hosts: list[str] = field(default_factory=list)
    max_result_bytes: PositiveInt = 64 * 1024  # a tool's answer beyond this is cut before the model sees it


class ChunkConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    # Tokens are estimated at 4 characters each (chunker.py); 256 stays well inside
    # llama-server's default embedding batch (512 tokens) even for denser text.
    tokens: PositiveInt = 256
    overlap: NonNegInt = 32


class CollectionConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    """One retrieval collection (rag.py): documents embedded by one embeddings model of
    ``models:``, answered by one chat model, kept in one store."""

    embedding_model: str
    chat_model: str | None = None  # POST .../chat needs it; search works without
    store: Literal["sqlite", "qdrant"] = "sqlite"  # sqlite: sqlite-vec in rag.path
    url_env: str | None = None  # qdrant: the server's URL from this environment variable
    qdrant_path: str | None = None  # qdrant without url_env: local mode in this folder (":memory:" in tests)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    top_k: PositiveInt = 4
    max_top_k: PositiveInt = 50
    max_document_bytes: PositiveInt = 1024 * 1024  # one text of POST .../documents (UTF-8)
    embed_batch: PositiveInt = 16  # chunks per embedding call
    # Who may use it: every key when both are empty; else a key whose tier is in tiers or
    # whose id is in keys.
    tiers: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


class RagConfig(_Section, kw_only=True, forbid_unknown_fields=True):
    path: str | None = None  # the sqlite-vec file; default rag.sqlite3 beside usage.path
    collections: dict[str, CollectionConfig] = field(default_factory=dict)


class Config(_Section, kw_only=True, forbid_unknown_fields=True):
    # Empty is valid (a fresh package install serves nothing until ops add a model).
    models: dict[str, ModelConfig] = field(default_factory=dict)
    server: ServerConfig = field(default_factory=ServerConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    keys: list[KeyConfig] = field(default_factory=list)
    launchers: LaunchersConfig = field(default_factory=LaunchersConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tools: dict[str, ToolConfig] = field(default_factory=dict)
    tool_loop: ToolLoopConfig = field(default_factory=ToolLoopConfig)
    rag: RagConfig = field(default_factory=RagConfig)
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


def find(path: str | None) -> Path:
    """The file to read: ``-c`` if given, else ./config.yaml, else /etc/llm-api/config.yaml."""
    if path:
        return Path(path)
    for p in DEFAULT_PATHS:
        if p.exists():
            return p
    raise ConfigError("config", [f"no config file given and none of {', '.join(map(str, DEFAULT_PATHS))} exists"])


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
    if merged["cache_hit_requests"] is None:
        merged["cache_hit_requests"] = True
    if merged["cache_hit_tokens"] is None:
        merged["cache_hit_tokens"] = False
    if merged["monthly_tokens"] == 0:
        merged["monthly_tokens"] = None
    return LimitFields(**merged)
