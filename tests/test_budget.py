"""budget.py and gguf.py: sizes, the KV-cache estimate from a GGUF header, resources per replica.

The GGUF files are written here (header only, the layout of the spec), so no model download is
needed; test_real_ondemand.py uses the estimate of the real Gemma file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from llmd import configfile, gguf
from llmd.budget import COMPUTE_ALLOWANCE, EstimateError, capacity, parse_size, replica_bytes, replica_needs
from llmd.config import ConfigError, ModelConfig


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, kv: list[tuple[str, int, object]]) -> Path:
    """A GGUF v3 header with these (key, type, value) pairs and no tensors."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for key, vtype, value in kv:
        out += _str(key) + struct.pack("<I", vtype)
        if vtype == 4:
            out += struct.pack("<I", value)
        elif vtype == 8:
            out += _str(str(value))
        elif vtype == 9:  # an array of strings
            assert isinstance(value, list)
            out += struct.pack("<IQ", 8, len(value)) + b"".join(_str(v) for v in value)
    path.write_bytes(out + b"\0" * 4096)  # stands in for the tensors
    return path


def llama_like(path: Path, kv_heads: bool = True) -> Path:
    kv: list[tuple[str, int, object]] = [
        ("general.architecture", 8, "llama"),
        ("tokenizer.ggml.tokens", 9, ["<s>", "</s>", "hello"]),
        ("llama.block_count", 4, 4),
        ("llama.embedding_length", 4, 256),
        ("llama.attention.head_count", 4, 8),
        ("llama.context_length", 4, 2048),
    ]
    if kv_heads:
        kv.append(("llama.attention.head_count_kv", 4, 2))
    return write_gguf(path, kv)


def test_parse_size() -> None:
    assert parse_size("6GiB") == 6 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("900MB") == 900_000_000
    assert parse_size("512 MiB") == 512 << 20
    assert parse_size(1234) == 1234
    for bad in ("6 parsecs", "-1G", "G", ""):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)


def test_kv_shape_defaults_like_llama_cpp(tmp_path: Path) -> None:
    # head_dim = 256 / 8 = 32 for K and V; 2 KV heads; without head_count_kv: all 8 heads.
    assert gguf.kv_shape(str(llama_like(tmp_path / "a.gguf"))) == (4, 2 * 64, 2048)
    assert gguf.kv_shape(str(llama_like(tmp_path / "b.gguf", kv_heads=False))) == (4, 8 * 64, 2048)
    (tmp_path / "c.gguf").write_bytes(b"not a model")
    with pytest.raises(gguf.GGUFError, match="not a GGUF"):
        gguf.kv_shape(str(tmp_path / "c.gguf"))


def test_replica_estimate_from_file_and_args(tmp_path: Path) -> None:
    path = llama_like(tmp_path / "m.gguf")
    size = path.stat().st_size
    per_token = 4 * 128  # layers x K+V elements

    def est(*args: str) -> int:
        return replica_bytes(ModelConfig(backend="llama-server", model=str(path), args=list(args)))

    assert est() == size + per_token * 2048 * 2 + COMPUTE_ALLOWANCE  # no -c: the trained context, f16
    assert est("-c", "512", "-np", "4") == size + per_token * 512 * 2 + COMPUTE_ALLOWANCE
    assert est("-c", "512", "-ctk", "q8_0", "-ctv", "q8_0") == size + int(per_token * 512 * 34 / 32) + COMPUTE_ALLOWANCE
    given = ModelConfig(backend="vllm", model="/nowhere", memory="20GiB", gpus=[[0, 1]])
    assert replica_bytes(given) == 20 << 30
    # Split over the GPUs of the replica; a resource without a budget is not counted.
    assert replica_needs(given, 0, {"gpu0": 1 << 40, "gpu1": 1 << 40}) == {"gpu0": 10 << 30, "gpu1": 10 << 30}
    assert replica_needs(given, 0, {"ram": 1 << 40}) == {}
    with pytest.raises(EstimateError, match="set memory"):
        replica_bytes(ModelConfig(backend="vllm", model="/nowhere"))
    with pytest.raises(EstimateError, match="cannot read"):
        replica_bytes(ModelConfig(backend="llama-server", model=str(tmp_path / "missing.gguf")))


def test_hostile_sizes_are_value_errors() -> None:
    # Hundreds of digits parse as float inf: a clear ValueError, not OverflowError.
    for bad in ("9" * 400 + "G", "1e999GiB", "NaN", "inf", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)


def _header(kv: bytes, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv


def _kv(key: str, vtype: int, raw: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + raw


_ARCH = _kv("general.architecture", 8, _str("llama"))
_DIMS = _kv("llama.block_count", 4, struct.pack("<I", 2)) + _kv("llama.embedding_length", 4, struct.pack("<I", 64))


@pytest.mark.parametrize(
    "data",
    [
        # a scalar array claiming 2^63 elements (seek() would overflow)
        _header(_ARCH + _kv("x", 9, struct.pack("<IQ", 4, 1 << 63)), 2),
        # a string array claiming 2^40 elements over a short file
        _header(_ARCH + _kv("x", 9, struct.pack("<IQ", 8, 1 << 40)), 2),
        # arrays nested thousands deep (would exhaust the stack)
        _header(_str("general.architecture") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000, 1),
        # general.architecture that is not a string
        _header(_kv("general.architecture", 4, struct.pack("<I", 7)), 1),
        # per-layer head counts of 0 (division by zero), a head count that is a string
        _header(_ARCH + _DIMS + _kv("llama.attention.head_count", 9, struct.pack("<IQII", 4, 2, 0, 0)), 4),
        _header(_ARCH + _DIMS + _kv("llama.attention.head_count", 8, _str("x")), 4),
        # truncated after the version
        b"GGUF" + struct.pack("<I", 3),
    ],
)
def test_garbage_gguf_is_a_gguf_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(gguf.GGUFError):
        gguf.kv_shape(str(path))
    with pytest.raises(EstimateError, match="cannot read"):
        replica_bytes(ModelConfig(backend="llama-server", model=str(path)))


def test_vram_budget_as_the_readme_writes_it() -> None:
    """README: ``memory_budget: {ram: 6GiB, vram: {0: 20GiB, 1: 20GiB}}``. YAML reads the GPU
    indexes as ints, which the decoder refused ("keys must be strings")."""
    cfg = configfile.parse("server:\n  memory_budget: {ram: 6GiB, vram: {0: 20GiB, '1': 20GiB}}\n")
    assert capacity(cfg.server.memory_budget) == {"ram": 6 << 30, "gpu0": 20 << 30, "gpu1": 20 << 30}
    with pytest.raises(ConfigError, match=r"vram\.x: keys must be integers"):
        configfile.parse("server:\n  memory_budget: {vram: {x: 1GiB}}\n")
