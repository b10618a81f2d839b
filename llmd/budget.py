"""The memory budget: what supervised replicas may hold at once, and each replica's estimate.

Resources are named ``ram`` and ``gpu0``, ``gpu1``... A replica with a ``gpus`` set holds its
estimate split evenly over those GPUs; one without holds it in ``ram``. A resource with no
figure in ``server.memory_budget`` is unlimited.

The estimate of a replica is ``models.NAME.memory`` when given, else (llama-server) the GGUF
file's size + its KV cache + a fixed allowance for compute buffers. The KV cache is
``layers x (K+V per token) x context x bytes per element``, from the GGUF header (gguf.py) and
the args: ``-c`` (0 or absent: the model's trained context, as llama-server does) and
``-ctk``/``-ctv`` (f16 by default). It is an upper bound for sliding-window models (Gemma 3
keeps a smaller cache for its SWA layers). A vLLM replica takes what ``--gpu-memory-utilization``
says of the GPU, which llmd cannot see: give it ``memory``.

Sizes in the config are bytes or strings: "6GiB", "1.5G" (G = GiB here, as ops write it),
"900MB" (MB = 10^6), "512MiB", "2048K".
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from llmd import gguf
from llmd.config import MemoryBudgetConfig, ModelConfig, Size
from llmd.launchers import flag_value

GiB = 1 << 30
MiB = 1 << 20
COMPUTE_ALLOWANCE = 96 * MiB  # llama-server's compute buffers and runtime beside weights and KV
_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
# Bytes per KV element for llama.cpp's cache types (block formats: bytes per block / 32).
KV_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}  # fmt: skip

Resources = dict[str, int]  # resource name -> bytes


class EstimateError(ValueError):
    """A replica's memory cannot be estimated (and the config gives no ``memory``)."""


def parse_size(value: Size) -> int:
    """Bytes of a config size; ValueError with the accepted forms when it is not one."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 6GiB, 1.5G, 900MB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE.match(value)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 6GiB, 1.5G, 900MB or a number of bytes, got {value!r}")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n):  # "999...9G" (hundreds of digits) is inf as a float
        raise ValueError("size is too large to be a number of bytes")
    return int(n)


def fmt(n: float) -> str:
    """A size for people: 1.2 GiB, 300 MiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def capacity(cfg: MemoryBudgetConfig | None) -> Resources:
    """The limited resources and their sizes ({} when there is no budget)."""
    if cfg is None:
        return {}
    cap: Resources = {}
    if cfg.ram is not None:
        cap["ram"] = parse_size(cfg.ram)
    for gpu, size in cfg.vram.items():
        cap[f"gpu{gpu}"] = parse_size(size)
    return cap


def kv_cache_bytes(model_path: str, args: Sequence[str], env: Mapping[str, str]) -> int:
    layers, per_token, trained_ctx = gguf.kv_shape(model_path)
    ctx_flag = flag_value(args, ("-c", "--ctx-size")) or env.get("LLAMA_ARG_CTX_SIZE")
    try:
        ctx = int(ctx_flag) if ctx_flag is not None else 0
    except ValueError:
        ctx = 0
    ctx = ctx or trained_ctx
    k_type = (flag_value(args, ("-ctk", "--cache-type-k")) or "f16").lower()
    v_type = (flag_value(args, ("-ctv", "--cache-type-v")) or "f16").lower()
    per_elem = (KV_TYPE_BYTES.get(k_type, 2.0) + KV_TYPE_BYTES.get(v_type, 2.0)) / 2
    return int(layers * per_token * ctx * per_elem)


def replica_bytes(model: ModelConfig) -> int:
    """One replica's estimate in bytes (see the module docstring)."""
    if model.memory is not None:
        return parse_size(model.memory)
    if model.backend != "llama-server" or not model.model:
        raise EstimateError("llmd cannot estimate this backend's memory; set memory (e.g. memory: 20GiB)")
    try:
        size = os.path.getsize(model.model)
        return size + kv_cache_bytes(model.model, model.args, model.env) + COMPUTE_ALLOWANCE
    except (OSError, gguf.GGUFError) as e:
        raise EstimateError(f"cannot read {model.model} to estimate its memory ({e}); set memory") from None


def replica_needs(model: ModelConfig, index: int, cap: Resources) -> Resources:
    """What replica ``index`` holds of each *limited* resource ({} when none applies to it)."""
    gpus = model.gpus[index] if model.gpus is not None and index < len(model.gpus) else None
    names = [f"gpu{g}" for g in gpus] if gpus else ["ram"]
    if not any(n in cap for n in names):
        return {}
    total = replica_bytes(model)
    share = -(-total // len(names))  # ceil: never under-count
    return {n: share for n in names if n in cap}
