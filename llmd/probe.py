"""What a supervised replica says about itself over HTTP: its health route's status, its slots
(llama-server's /props) and its load signals (its Prometheus metrics)."""

from __future__ import annotations

import logging

import aiohttp
import msgspec

from llmd.launchers import LaunchSpec, parse_metrics

log = logging.getLogger("llmd.process")


async def probe(session: aiohttp.ClientSession, spec: LaunchSpec, timeout_s: float) -> int | None:
    """GET the health route: its status, or None when nothing answered."""
    try:
        async with session.get(
            spec.origin + spec.health_path,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            raise_for_status=False,
        ) as resp:
            await resp.read()
            return resp.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


async def read_slots(session: aiohttp.ClientSession, spec: LaunchSpec, name: str) -> int:
    """llama-server's /props total_slots; otherwise (or if /props fails) the spec's."""
    if spec.props_path is None:
        return spec.slots
    try:
        async with session.get(
            spec.origin + spec.props_path,
            timeout=aiohttp.ClientTimeout(total=5.0),
            raise_for_status=True,
        ) as resp:
            body = await resp.read()
        slots = msgspec.json.decode(body).get("total_slots")
        if isinstance(slots, int) and slots > 0:
            return slots
        raise ValueError(f"total_slots is {slots!r}")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError, msgspec.DecodeError) as e:
        log.warning(
            "%s: cannot read slots from %s (%s); assuming %d",
            name,
            spec.props_path,
            e,
            spec.slots,
            extra={"replica": name},
        )
        return spec.slots


async def scrape_metrics(session: aiohttp.ClientSession, spec: LaunchSpec, name: str) -> dict[str, float] | None:
    """The replica's load signals (launchers.parse_metrics), or None without them."""
    if spec.metrics_path is None:
        return None
    try:
        async with session.get(
            spec.origin + spec.metrics_path,
            timeout=aiohttp.ClientTimeout(total=5.0),
            raise_for_status=True,
        ) as resp:
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError) as e:
        # Load signals are advisory: a failed scrape is not a failed health check.
        log.debug("%s: metrics scrape failed: %s", name, e, extra={"replica": name})
        return None
    return parse_metrics(text)
