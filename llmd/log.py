"""Logging: one JSON object per line (or plain text), with structured fields.

Callers pass fields as ``extra={...}``; the access log passes ``extra={"fields": {...}}``.
Secrets never reach here: only key ids travel past auth.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import msgspec

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_encode = msgspec.json.Encoder().encode


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.__dict__.items():
        if k in _STANDARD:
            continue
        if k == "fields" and isinstance(v, dict):
            out.update(v)
        else:
            out[k] = v
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        try:
            return _encode(doc).decode()
        except TypeError:
            return _encode({k: str(v) for k, v in doc.items()}).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "json") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # llmd writes its own access log


class AccessLog:
    """The access log's fast path: one JSON line per request, encoded straight from its fields
    (no LogRecord, no Formatter) and written in batches, one write(2) per ``batch_s``. That
    is ~15% of llmd's CPU per request (bench/relay_bench.py). Whenever anything but llmd's own
    JSON stderr handler would see the record (text format, an extra handler, pytest's caplog),
    it goes through ``logging`` as usual. ``flush()`` at shutdown writes what is left."""

    def __init__(self, batch_s: float = 0.02) -> None:
        self.batch_s = batch_s
        self._logger = logging.getLogger("llmd.access")
        self._buf: list[bytes] = []
        self._scheduled = False
        self._sec = -1
        self._stamp = ""

    def _direct(self) -> bool:
        root = logging.getLogger()
        return (
            not self._logger.handlers
            and len(root.handlers) == 1
            and isinstance(root.handlers[0].formatter, JsonFormatter)
            and getattr(root.handlers[0], "stream", None) is sys.stderr
        )

    def write(self, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if not self._direct():
            self._logger.info("access", extra={"fields": fields})
            return
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec, self._stamp = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        doc = {
            "time": f"{self._stamp}.{int((now - sec) * 1000):03d}Z",
            "level": "info",
            "logger": "llmd.access",
            "msg": "access",
        }
        doc.update(fields)
        self._buf.append(_encode(doc))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.batch_s, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        data = b"\n".join(self._buf) + b"\n"
        self._buf.clear()
        sys.stderr.flush()  # keep order with lines the logging module already wrote
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
