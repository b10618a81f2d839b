"""launchers.py: argv, environment, slots and /metrics parsing; pure, no processes."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from llmd.config import Config, LauncherConfig, LaunchersConfig, ModelConfig
from llmd.launchers import (
    VLLM_DEFAULT_MAX_NUM_SEQS_CPU,
    VLLM_DEFAULT_MAX_NUM_SEQS_GPU,
    LaunchError,
    flag_value,
    launch_spec,
    parse_metrics,
    validate,
)

# Copies of shared/reference/observed/ kept with the tests: a clean clone anywhere must run them.
OBSERVED = Path(__file__).resolve().parent / "data" / "observed"
ENVIRON = {"PATH": "/usr/bin", "HOME": "/var/lib/llm-api", "LANG": "C.UTF-8", "LC_ALL": "C",
           "LLMD_KEY_CI": "secret", "AWS_SECRET_ACCESS_KEY": "x", "HF_HOME": "/srv/hf",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
LLAMA = LauncherConfig(command="llama-server", env={"LLAMA_ARG_FOO": "1"})
VLLM = LauncherConfig(command=["python3", "-m", "vllm.entrypoints.openai.api_server"],
                      env={"VLLM_HOST_IP": "127.0.0.1"})


def llama(**kw: object) -> ModelConfig:
    return ModelConfig(backend="llama-server", model="/m/gemma.gguf", **kw)  # type: ignore[arg-type]


def vllm(**kw: object) -> ModelConfig:
    return ModelConfig(backend="vllm", model="/srv/models/llama", **kw)  # type: ignore[arg-type]


def observed_metrics(name: str) -> str:
    """The /metrics body inside an observed vLLM HTTP transcript."""
    text = (OBSERVED / "vllm-0.32-cpu" / name).read_text()
    section = text.split("### GET /metrics (vllm: lines, no buckets)\n", 1)[1]
    return section.split("\n###", 1)[0]


def test_llama_server_argv_adds_model_alias_metrics_then_args_then_address() -> None:
    spec = launch_spec("gemma", llama(args=["-c", "4096", "--jinja", "-np", "2"]), LLAMA, 0, port=4321,
                       environ=ENVIRON)
    assert spec.argv == [
        "llama-server", "-m", "/m/gemma.gguf", "--alias", "gemma", "--metrics",
        "-c", "4096", "--jinja", "-np", "2", "--host", "127.0.0.1", "--port", "4321",
    ]
    assert spec.replica == "gemma/0"
    assert spec.health_path == "/health" and spec.props_path == "/props" and spec.metrics_path == "/metrics"
    assert spec.slots == 2  # the fallback when /props cannot be read
    assert spec.origin == "http://127.0.0.1:4321"


def test_llama_server_threads_default_to_the_replica_cpu_set() -> None:
    model = llama(replicas=2, cpus=[[0, 1, 2], [3]])
    assert flag_value(launch_spec("g", model, LLAMA, 0).argv, ["-t"]) == "3"
    assert flag_value(launch_spec("g", model, LLAMA, 1).argv, ["-t"]) == "1"
    assert launch_spec("g", model, LLAMA, 1).cpus == (3,)


@pytest.mark.parametrize("given", [["-t", "8"], ["--threads", "8"], ["--threads=8"]])
def test_llama_server_threads_from_args_win(given: list[str]) -> None:
    argv = launch_spec("g", llama(cpus=[[0, 1]], args=given), LLAMA, 0).argv
    assert "-t" not in argv[: argv.index(given[0])]  # not added by llmd
    assert argv.count(given[0]) == 1


def test_llama_server_without_cpus_gets_no_threads_flag() -> None:
    assert not {"-t", "--threads"} & set(launch_spec("g", llama(), LLAMA, 0).argv)


def test_flags_given_in_args_are_not_duplicated() -> None:
    argv = launch_spec("g", llama(args=["--alias", "other", "--metrics"]), LLAMA, 0).argv
    assert argv.count("--alias") == 1 and argv.count("--metrics") == 1
    assert flag_value(argv, ["--alias"]) == "other"


@pytest.mark.parametrize("flag", ["--port", "--host", "-m", "--model"])
def test_llama_server_reserved_flags_are_refused(flag: str) -> None:
    model = llama(args=[flag, "x"])
    with pytest.raises(LaunchError, match=f"models.g.args: {flag} is set by llmd"):
        launch_spec("g", model, LLAMA, 0)
    assert validate(Config(models={"g": model})) == [
        f"models.g.args: {flag} is set by llmd (it binds each replica to 127.0.0.1 on a free port "
        "and names the model itself); remove it"
    ]


def test_reserved_flag_with_equals_is_refused() -> None:
    with pytest.raises(LaunchError):
        launch_spec("g", llama(args=["--port=8080"]), LLAMA, 0)


def test_vllm_argv_gpus_and_tensor_parallel() -> None:
    spec = launch_spec("llama-70b", vllm(gpus=[[0, 1, 2, 3]], args=["--max-model-len", "8192"]), VLLM, 0,
                       port=5555, environ=ENVIRON)
    assert spec.argv == [
        "python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/srv/models/llama",
        "--served-model-name", "llama-70b", "--tensor-parallel-size", "4", "--max-model-len", "8192",
        "--host", "127.0.0.1", "--port", "5555",
    ]
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert spec.gpus == (0, 1, 2, 3)
    assert spec.props_path is None
    assert spec.slots == VLLM_DEFAULT_MAX_NUM_SEQS_GPU == 256


def test_vllm_per_replica_gpu_sets() -> None:
    model = vllm(replicas=2, gpus=[[0, 1], [2, 3]])
    assert launch_spec("v", model, VLLM, 1).env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert flag_value(launch_spec("v", model, VLLM, 1).argv, ["--tensor-parallel-size"]) == "2"


def test_vllm_tensor_parallel_from_args_and_pipeline_parallel() -> None:
    argv = launch_spec("v", vllm(gpus=[[0, 1, 2, 3]], args=["-tp", "2"]), VLLM, 0).argv
    assert "--tensor-parallel-size" not in argv
    argv = launch_spec("v", vllm(gpus=[[0, 1, 2, 3]], args=["--pipeline-parallel-size", "2"]), VLLM, 0).argv
    assert flag_value(argv, ["--tensor-parallel-size"]) == "2"


def test_vllm_slots_from_max_num_seqs_else_the_default() -> None:
    assert launch_spec("v", vllm(args=["--max-num-seqs", "48"]), VLLM, 0).slots == 48
    assert launch_spec("v", vllm(args=["--max-num-seqs=12"]), VLLM, 0).slots == 12
    # No GPU set: the CPU build's default.
    assert launch_spec("v", vllm(), VLLM, 0).slots == VLLM_DEFAULT_MAX_NUM_SEQS_CPU == 128


@pytest.mark.parametrize("flag", ["--served-model-name", "--model", "--port"])
def test_vllm_reserved_flags_are_refused(flag: str) -> None:
    with pytest.raises(LaunchError):
        launch_spec("v", vllm(args=[flag, "x"]), VLLM, 0)


def test_env_is_an_allow_list_plus_launcher_then_model_env() -> None:
    model = llama(env={"LLAMA_ARG_FOO": "2", "OMP_NUM_THREADS": "1"})
    env = launch_spec("g", model, LLAMA, 0, environ=ENVIRON).env
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/var/lib/llm-api" and env["LC_ALL"] == "C"
    assert env["HF_HOME"] == "/srv/hf"
    assert "LLMD_KEY_CI" not in env and "AWS_SECRET_ACCESS_KEY" not in env  # secrets stay in llmd
    assert env["LLAMA_ARG_FOO"] == "2"  # the model's env wins over the launcher's
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    # Not pinned to GPUs: llmd's own CUDA_VISIBLE_DEVICES passes through untouched.
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_gpus_and_cuda_visible_devices_in_env_is_a_config_error() -> None:
    cfg = Config(models={"v": vllm(gpus=[[0]], env={"CUDA_VISIBLE_DEVICES": "1"})})
    assert validate(cfg) == ["models.v.env.CUDA_VISIBLE_DEVICES: set from gpus; remove one of them"]


def test_timeouts_come_from_the_launcher_and_the_model_override() -> None:
    launcher = LauncherConfig(command="x", start_timeout_s=300, stop_timeout_s=7, health_interval_s=3)
    spec = launch_spec("g", llama(start_timeout_s=20), launcher, 0)
    assert (spec.start_timeout_s, spec.stop_timeout_s, spec.health_interval_s) == (20, 7, 3)


def test_identity_ignores_port_and_timeouts_but_not_args_env_or_cpus() -> None:
    base = launch_spec("g", llama(cpus=[[0]]), LLAMA, 0, port=1, environ=ENVIRON)
    assert msgspec.structs.replace(base, port=2).identity() == base.identity()
    slower = LauncherConfig(command="llama-server", env={"LLAMA_ARG_FOO": "1"}, start_timeout_s=1)
    assert launch_spec("g", llama(cpus=[[0]]), slower, 0, environ=ENVIRON).identity() == base.identity()
    for other in (llama(cpus=[[1]]), llama(cpus=[[0]], args=["-c", "1"]), llama(cpus=[[0]], env={"A": "1"})):
        assert launch_spec("g", other, LLAMA, 0, environ=ENVIRON).identity() != base.identity()


def test_default_launchers_run_llama_server_and_vllm_api_server() -> None:
    launchers = LaunchersConfig()
    assert launch_spec("g", llama(), launchers.llama_server, 0).argv[0] == "llama-server"
    assert launch_spec("v", vllm(), launchers.vllm, 0).argv[:3] == [
        "python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert launch_spec("v", vllm(), launchers.vllm, 0).env["VLLM_HOST_IP"] == "127.0.0.1"


def test_openai_backend_has_no_launch_spec() -> None:
    with pytest.raises(LaunchError):
        launch_spec("r", ModelConfig(backend="openai", urls=["http://x/v1"]), LLAMA, 0)


# --- /metrics ----------------------------------------------------------------------------------


def test_parse_observed_llama_server_metrics() -> None:
    text = (OBSERVED / "llama-server" / "metrics.body").read_text()
    assert parse_metrics(text) == {"running": 0.0, "waiting": 0.0}


def test_parse_llama_server_metrics_with_load_and_kv_gauge() -> None:
    text = (
        "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
        "llamacpp:requests_deferred 5\nllamacpp:kv_cache_usage_ratio 0.25\n"
        "llamacpp:prompt_tokens_total 999\n"
    )
    assert parse_metrics(text) == {"running": 2.0, "waiting": 5.0, "kv_cache_usage": 0.25}


@pytest.mark.parametrize("name", ["generation.http.txt", "embeddings.http.txt"])
def test_parse_observed_vllm_metrics(name: str) -> None:
    assert parse_metrics(observed_metrics(name)) == {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}


def test_parse_vllm_metrics_sums_engines_and_takes_the_fullest_kv_cache() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 7.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="a } b"} 0.9\n'
        "vllm:num_requests_waiting NaN\n"
        "garbage line\n"
    )
    assert parse_metrics(text) == {"running": 7.0, "waiting": 1.0, "kv_cache_usage": 0.9}


def test_parse_empty_metrics() -> None:
    assert parse_metrics("") == {}
