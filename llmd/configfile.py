"""Reading config.yaml: YAML, decoded into a ``Config`` (``decode``), checked (``checks``),
relative paths resolved against the file's directory.

Loading never stops at the first mistake: every error is collected with its YAML path
(``models.qwen.replicas: must be >= 1``) and raised at once in a ``ConfigError``, so that
``llmd check`` can list them all, like ``nginx -t``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .checks import check
from .config import Config, ConfigError, find
from .decode import decode


def _resolve_paths(cfg: Config, base: Path) -> None:
    def resolve(p: str) -> str:
        return str((base / p).resolve()) if p and not os.path.isabs(p) else p

    cfg.usage.path = resolve(cfg.usage.path)
    if cfg.cache.path:
        cfg.cache.path = resolve(cfg.cache.path)
    if cfg.rag.path:
        cfg.rag.path = resolve(cfg.rag.path)
    for c in cfg.rag.collections.values():
        if c.qdrant_path and c.qdrant_path != ":memory:":
            c.qdrant_path = resolve(c.qdrant_path)
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
    cfg = decode(raw, Config, errors)
    if cfg is not None:
        errors.extend(check(cfg))
    if errors or cfg is None:
        raise ConfigError(source, errors or ["invalid config"])
    cfg.source = source
    _resolve_paths(cfg, base or Path.cwd())
    return cfg


def load(path: str | Path | None = None) -> Config:
    p = find(str(path) if path else None)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror}"]) from None
    return parse(text, source=str(p), base=p.resolve().parent)
