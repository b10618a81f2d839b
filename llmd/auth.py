"""API keys -> Principal. Secrets are looked up by their sha256, never compared byte by byte,
and never stored, logged or echoed: only the key's id travels further.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass

from aiohttp import web

from .config import Config, LimitFields, limits_for
from .errors import invalid_key

log = logging.getLogger("llmd.auth")

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tier: str
    limits: LimitFields
    models: frozenset[str] | None  # config model names it may use; None = all
    admin: bool = False
    default_model: str | None = None  # serves this key's requests that name no model

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def hash_secret(secret: str) -> str:
    # surrogateescape: a header with bytes that are not UTF-8 arrives with them as lone
    # surrogates; hash those bytes as sent (matching no key: 401) instead of failing (500).
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    """A fresh key: 'sk-' + 256 bits of randomness, URL-safe."""
    return "sk-" + secrets.token_urlsafe(32)


class KeyTable:
    """sha256(secret) -> Principal. With no keys configured llmd is open (every caller is
    'anonymous'); DESIGN's default binds loopback only, and startup logs a warning."""

    def __init__(self, cfg: Config) -> None:
        names = cfg.model_names()
        self._by_hash: dict[str, Principal] = {}
        self._revoked: set[str] = set()
        self.open = not cfg.keys
        self.ids = [k.id for k in cfg.keys]
        self.anonymous = Principal(ANONYMOUS, "", LimitFields(priority=0), None)
        for k in cfg.keys:
            digest = k.sha256 or hash_secret(os.environ.get(k.secret_env or "", ""))
            if k.revoked:
                self._revoked.add(digest)
                continue
            models = frozenset(names[m] for m in k.models) if k.models is not None else None
            self._by_hash[digest] = Principal(k.id, k.tier or "", limits_for(cfg, k), models, k.admin, k.default_model)

    def principals(self) -> list[Principal]:
        return list(self._by_hash.values())

    def authenticate(self, request: web.Request) -> Principal:
        if self.open:
            return self.anonymous
        secret = _secret_from(request)
        if secret is None:
            raise invalid_key(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            )
        digest = hash_secret(secret)
        principal = self._by_hash.get(digest)
        if principal is None:
            if digest in self._revoked:
                raise invalid_key("This API key has been revoked.")
            raise invalid_key()
        return principal


# HTTP's whitespace around a credential: spaces and tabs only. str.strip() would also take
# Unicode spaces (U+2003...) off, so "Bearer \u2003<secret>" would authenticate as <secret>.
_OWS = " \t"


def _secret_from(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip(_OWS):
            return value.strip(_OWS)
    key = request.headers.get("X-API-Key") or request.headers.get("api-key")
    return key.strip(_OWS) if key and key.strip(_OWS) else None
