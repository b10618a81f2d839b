"""Typed keys for the aiohttp application and request state."""

from __future__ import annotations

from aiohttp import web

from .call import Call
from .runtime import Services

SERVICES = web.AppKey("services", Services)
CALL = web.RequestKey("llmd.call", Call)
