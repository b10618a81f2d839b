"""GGUF metadata: the few header values llmd needs to estimate a model's KV cache.

A GGUF file starts with ``GGUF``, a version, the tensor and key-value counts, then the
key-value pairs (``general.architecture`` first, then the architecture's own keys, then the
tokenizer's large arrays). Reading stops as soon as the wanted keys are known, so the
tokenizer's vocabulary is usually not read at all.
"""

from __future__ import annotations

import os
import struct
from typing import IO, Any

MAGIC = b"GGUF"
# GGUF value types -> struct format of a scalar (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_STRING = 1 << 20  # a longer "string" means a corrupt or non-GGUF file
MAX_DEPTH = 4  # arrays of arrays deeper than this mean a corrupt file (and would exhaust the stack)


class GGUFError(ValueError):
    """Not a GGUF file, or one llmd cannot read."""


def _read(f: IO[bytes], n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise GGUFError("truncated GGUF header")
    return b


def _size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


def _string(f: IO[bytes]) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8))
    if n > MAX_STRING:
        raise GGUFError("implausible string length in GGUF header")
    return _read(f, n).decode("utf-8", "replace")


def _value(f: IO[bytes], vtype: int, keep: bool, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, n = struct.unpack("<IQ", _read(f, 12))
        # Every element takes at least a byte: a longer array is garbage (a huge count would
        # overflow seek() or loop for ages over a truncated file).
        if n > _size(f) or depth >= MAX_DEPTH:
            raise GGUFError("implausible array in GGUF header")
        if etype in _SCALARS and not keep:
            f.seek(struct.calcsize(_SCALARS[etype]) * n, 1)  # skip, e.g. token scores
            return None
        items = [_value(f, etype, keep, depth + 1) for _ in range(n)]
        return items if keep else None
    raise GGUFError(f"unknown GGUF value type {vtype}")


def metadata(path: str, wanted: frozenset[str] | None = None) -> dict[str, Any]:
    """The header's key-values (only ``wanted`` ones, stopping once all are read, when given;
    arrays are kept only when wanted by name). ``general.architecture`` is always read."""
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file")
        version, _tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is not supported")
        for _ in range(n_kv):
            key = _string(f)
            (vtype,) = struct.unpack("<I", _read(f, 4))
            keep = wanted is None or key in wanted or key == "general.architecture"
            value = _value(f, vtype, keep)
            if keep:
                out[key] = value
            if wanted is not None and "general.architecture" in out:
                arch = out["general.architecture"]
                if not isinstance(arch, str):
                    raise GGUFError(f"{path}: general.architecture is not a string")
                if all(k.replace("{arch}", arch) in out for k in wanted):
                    break
                wanted = frozenset(k.replace("{arch}", arch) for k in wanted)
    return out


_KV_KEYS = frozenset(
    {
        "{arch}.block_count",
        "{arch}.embedding_length",
        "{arch}.attention.head_count",
        "{arch}.attention.head_count_kv",
        "{arch}.attention.key_length",
        "{arch}.attention.value_length",
        "{arch}.context_length",
    }
)


def kv_shape(path: str) -> tuple[int, int, int]:
    """(layers, K+V elements per token and layer, trained context length) of a GGUF model.

    K/V lengths default to embedding_length / head_count and head_count_kv to head_count,
    as llama.cpp does when the file omits them."""
    meta = metadata(path, _KV_KEYS)  # "{arch}" is filled in once general.architecture is read
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: no general.architecture")

    def get(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    def count(name: str, default: int | None = None) -> int:
        """A positive integer value (per-layer lists, as some architectures give for head
        counts: the largest); ``default`` when absent or 0; GGUFError for anything else."""
        v = get(name)
        if isinstance(v, list) and v:
            v = max(v) if all(type(x) is int for x in v) else None
        if not v and default is not None:
            return default
        if type(v) is not int or v <= 0:
            raise GGUFError(f"{path}: no usable {arch}.{name} ({v!r})")
        return v

    layers, heads, embd = count("block_count"), count("attention.head_count"), count("embedding_length")
    kv_heads = count("attention.head_count_kv", heads)
    k_len = count("attention.key_length", embd // heads)
    v_len = count("attention.value_length", embd // heads)
    ctx = get("context_length") or 0
    if type(ctx) is not int or ctx < 0:
        raise GGUFError(f"{path}: no usable {arch}.context_length ({ctx!r})")
    return layers, kv_heads * (k_len + v_len), ctx
