"""How to run one replica of a model: argv, environment and health routes per backend.

Pure functions of the config (and of the environment llmd was started with, passed in):
no I/O, so that reload can decide "unchanged" by comparing two specs, and tests need
no processes.

Contracts with the rest of llmd:

- llmd owns a replica's address: it always binds the child to 127.0.0.1 on a port it
  picked (``--host``/``--port`` are appended last), so those flags, and the flags that
  choose the model or its served name, are refused in ``args`` (``validate`` lists them
  for ``llmd check``; ``launch_spec`` raises ``LaunchError``).
- Flags llmd only *defaults* (``--metrics``, ``-t``, ``--alias``, ``--tensor-parallel-size``)
  are added only when ``args`` does not already give them, so the ops' value wins.
- A child's environment is a small allow-list of llmd's own (so API key secrets such as
  ``LLMD_KEY_*`` never reach a backend), then the launcher's ``env``, then the model's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from llmd.childlog import ChildLogMode
from llmd.config import Config, LauncherConfig, LaunchersConfig, ModelConfig

LOOPBACK = "127.0.0.1"

# vLLM's max_num_seqs when --max-num-seqs is absent (vllm/engine/arg_utils.py,
# EngineArgs.get_batch_defaults, OPENAI_API_SERVER usage context): 256 on GPUs, 1024 on
# GPUs with >= 70 GiB that are not A100s (H100, H200, MI300x), 128 x world size on the CPU
# platform. llmd cannot see which hardware vLLM will detect, so it takes the GPU value when
# the replica has a GPU set and the CPU value otherwise. Undershooting is harmless (llmd
# queues instead of vLLM); ops who want more set --max-num-seqs, which is then exact.
VLLM_DEFAULT_MAX_NUM_SEQS_GPU = 256
VLLM_DEFAULT_MAX_NUM_SEQS_CPU = 128

# Environment passed through from llmd's own: locale, paths, proxies, and the variables
# that steer GPU runtimes and model hubs. Anything else (API key secrets above all) is not.
_PASS_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
_PASS_ENV_PREFIXES = (
    "LC_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "HF_",
    "HUGGING_FACE_",
    "TRANSFORMERS_",
    "VLLM_",
    "OMP_",
    "XDG_",
)

# Flags llmd sets itself and will not let args override (see the module docstring).
_RESERVED = {
    "llama-server": ("--host", "--port", "-m", "--model"),
    "vllm": ("--host", "--port", "--model", "--served-model-name"),
}


class LaunchError(ValueError):
    """A model's config cannot be turned into a command line (a reserved flag in args)."""


class LaunchSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to run and supervise one replica.

    ``command`` is the full argv except ``--host``/``--port``, which ``argv`` appends from
    ``port``: a restart on a new port is ``msgspec.structs.replace(spec, port=p)``, and two
    specs that differ only in port start the same server (see ``identity``).
    """

    replica: str  # "model/index", the name in logs and metrics
    backend: str
    command: tuple[str, ...]
    env: dict[str, str]
    port: int = 0
    cpus: tuple[int, ...] | None = None
    gpus: tuple[int, ...] | None = None
    health_path: str = "/health"
    metrics_path: str | None = "/metrics"
    # llama-server reports its slot count on GET /props (total_slots); vLLM does not, so its
    # slots come from argv. ``slots`` is the answer when known without asking, else a fallback.
    props_path: str | None = None
    slots: int = 1
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    health_interval_s: float = 2.0
    health_failures: int = 3
    restart_delay_s: float = 1.0
    restart_max_delay_s: float = 60.0
    child_log: ChildLogMode = "quiet"  # quiet: the child's routine per-request lines at DEBUG (childlog.py)

    @property
    def argv(self) -> list[str]:
        return [*self.command, "--host", LOOPBACK, "--port", str(self.port)]

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def identity(self) -> tuple[object, ...]:
        """What makes a different running server: equal identity = keep the process on reload.

        Timeouts and health settings are not part of it; they apply to the running process.
        """
        return (self.backend, self.command, tuple(sorted(self.env.items())), self.cpus, self.gpus)


# --- args helpers ------------------------------------------------------------------------------


# Which routes (routes.py names) each backend serves. llama-server serves them all (its
# tools/server routes at the pinned version); vLLM 0.32 serves the OpenAI ones, Anthropic
# Messages, Responses, its own /tokenize and /detokenize and rerank (with a reranker model). A remote `openai`
# server serves what its model's `routes:` says, the OpenAI three by default.
LLAMA_SERVER_ROUTES = frozenset(
    {
        "chat", "completions", "embeddings", "messages", "count_tokens", "responses", "input_tokens",
        "chat_input_tokens", "infill", "completion", "tokenize", "detokenize", "apply_template", "rerank",
    }
)  # fmt: skip
VLLM_ROUTES = frozenset(
    {"chat", "completions", "embeddings", "messages", "count_tokens", "responses", "tokenize", "detokenize", "rerank"}
)
REMOTE_DEFAULT_ROUTES = ("chat", "completions", "embeddings")


def served_routes(model: ModelConfig) -> frozenset[str]:
    if model.backend == "llama-server":
        return LLAMA_SERVER_ROUTES
    if model.backend == "vllm":
        return VLLM_ROUTES
    return frozenset(model.routes if model.routes is not None else REMOTE_DEFAULT_ROUTES)


def flag_value(args: Sequence[str], names: Iterable[str]) -> str | None:
    """The value of the last ``--flag value`` or ``--flag=value`` among ``names``, else None."""
    names = tuple(names)
    found: str | None = None
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            found = args[i + 1]
        else:
            head, eq, tail = a.partition("=")
            if eq and head in names:
                found = tail
    return found


def has_flag(args: Sequence[str], names: Iterable[str]) -> bool:
    names = tuple(names)
    return any(a in names or a.partition("=")[0] in names for a in args)


def _int_flag(args: Sequence[str], names: Iterable[str]) -> int | None:
    v = flag_value(args, names)
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _command(launcher: LauncherConfig) -> list[str]:
    # A string command is one program path (no shell splitting: paths may contain spaces);
    # a list is an argv prefix such as [python3, -m, vllm.entrypoints.openai.api_server].
    return [launcher.command] if isinstance(launcher.command, str) else list(launcher.command)


def child_env(
    launcher: LauncherConfig, model: ModelConfig, gpus: Sequence[int] | None, environ: Mapping[str, str]
) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k in _PASS_ENV or k.startswith(_PASS_ENV_PREFIXES)}
    # A Python backend (vLLM) writing into a pipe would otherwise buffer its log lines for
    # minutes; harmless for llama-server. Either env below may set it back.
    env["PYTHONUNBUFFERED"] = "1"
    env.update(launcher.env)
    env.update(model.env)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return env


def reserved_flag_errors(name: str, model: ModelConfig) -> list[str]:
    """``models.NAME.args`` problems: flags llmd sets itself (for ``llmd check``)."""
    errors = []
    for flag in _RESERVED.get(model.backend, ()):
        if has_flag(model.args, (flag,)):
            errors.append(
                f"models.{name}.args: {flag} is set by llmd (it binds each replica to {LOOPBACK} "
                "on a free port and names the model itself); remove it"
            )
    if model.gpus is not None and "CUDA_VISIBLE_DEVICES" in model.env:
        errors.append(f"models.{name}.env.CUDA_VISIBLE_DEVICES: set from gpus; remove one of them")
    return errors


def validate(cfg: Config) -> list[str]:
    """Every launch problem of a config, each with its YAML path."""
    errors: list[str] = []
    for name, model in cfg.models.items():
        errors.extend(reserved_flag_errors(name, model))
    return errors


# --- specs -------------------------------------------------------------------------------------


def launcher_for(model: ModelConfig, launchers: LaunchersConfig) -> LauncherConfig:
    return launchers.llama_server if model.backend == "llama-server" else launchers.vllm


def launch_spec(
    name: str,
    model: ModelConfig,
    launcher: LauncherConfig,
    index: int,
    port: int = 0,
    environ: Mapping[str, str] | None = None,
) -> LaunchSpec:
    """The spec of replica ``index`` of model ``name`` (a supervised backend)."""
    errors = reserved_flag_errors(name, model)
    if errors:
        raise LaunchError("; ".join(errors))
    if not model.model:
        raise LaunchError(f"models.{name}.model: required for backend {model.backend}")
    cpus = tuple(model.cpus[index]) if model.cpus is not None else None
    gpus = tuple(model.gpus[index]) if model.gpus is not None else None
    args = list(model.args)
    argv = _command(launcher)
    if model.backend == "llama-server":
        argv += ["-m", model.model]
        # The gateway rewrites the model name anyway; the alias makes llama-server's own
        # /v1/models, /props and responses say the name clients use.
        if not has_flag(args, ("-a", "--alias")):
            argv += ["--alias", name]
        # llmd scrapes /metrics for load signals (requests processing/deferred).
        if not has_flag(args, ("--metrics",)):
            argv.append("--metrics")
        # Without -t llama-server starts one thread per core of the host, which oversubscribes
        # a replica pinned to a few CPUs.
        if cpus is not None and not has_flag(args, ("-t", "--threads")):
            argv += ["-t", str(len(cpus))]
        # /props says total_slots once it is up; this is the answer if /props is unreachable.
        slots = _int_flag(args, ("-np", "--parallel")) or 1
        props_path: str | None = "/props"
    elif model.backend == "vllm":
        argv += ["--model", model.model, "--served-model-name", name]
        pp = _int_flag(args, ("-pp", "--pipeline-parallel-size")) or 1
        tp = _int_flag(args, ("-tp", "--tensor-parallel-size"))
        if gpus is not None and tp is None:
            tp = max(1, len(gpus) // pp)
            argv += ["--tensor-parallel-size", str(tp)]
        default_seqs = (
            VLLM_DEFAULT_MAX_NUM_SEQS_GPU if gpus is not None else (VLLM_DEFAULT_MAX_NUM_SEQS_CPU * (tp or 1) * pp)
        )
        slots = _int_flag(args, ("--max-num-seqs",)) or default_seqs
        props_path = None
    else:
        raise LaunchError(f"models.{name}.backend: {model.backend} is not started by llmd")
    argv += args
    return LaunchSpec(
        replica=f"{name}/{index}",
        backend=model.backend,
        command=tuple(argv),
        env=child_env(launcher, model, gpus, os.environ if environ is None else environ),
        port=port,
        cpus=cpus,
        gpus=gpus,
        props_path=props_path,
        slots=slots,
        start_timeout_s=model.start_timeout_s or launcher.start_timeout_s,
        stop_timeout_s=launcher.stop_timeout_s,
        health_interval_s=launcher.health_interval_s,
        health_failures=launcher.health_failures,
        restart_delay_s=launcher.restart_delay_s,
        restart_max_delay_s=launcher.restart_max_delay_s,
        child_log=model.child_log,
    )


# --- backend /metrics --------------------------------------------------------------------------

# Backend metric name -> Replica.backend_metrics key. llama-server's KV gauge exists only in
# some builds (the observed build has none); vLLM renamed gpu_cache_usage_perc to
# kv_cache_usage_perc. Both "perc" gauges are fractions 0..1 despite the name.
_METRIC_KEYS = {
    "llamacpp:requests_processing": "running",
    "llamacpp:requests_deferred": "waiting",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
}


def parse_metrics(text: str) -> dict[str, float]:
    """Normalize a backend's Prometheus text into ``running``, ``waiting``, ``kv_cache_usage``.

    Series of one name with different labels (vLLM's engines under data parallelism) are
    summed for counts and maxed for the KV usage. Absent metrics are absent keys.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        key = _METRIC_KEYS.get(name.strip())
        if key is None:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if value != value:  # NaN: the backend has no value yet
            continue
        if key == "kv_cache_usage":
            out[key] = max(out.get(key, 0.0), value)
        else:
            out[key] = out.get(key, 0.0) + value
    return out
