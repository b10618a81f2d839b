"""How a request ended: one vocabulary for the ledger, the access log, metrics and errors."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    OK = "ok"
    CLIENT_ABORT = "client_abort"  # the client left before the answer ended
    UPSTREAM_ERROR = "upstream_error"  # the replica failed, or answered an error
    TIMEOUT = "timeout"  # routing.timeouts ran out
    REJECTED_RATE = "rejected_rate"  # a per-key window or max_concurrent (429)
    REJECTED_QUOTA = "rejected_quota"  # the monthly quota (429)
    REJECTED_QUEUE = "rejected_queue"  # the model's queue full or the wait expired (503)
    INVALID = "invalid"  # refused before the limits (401/403/404/400/413): no ledger row
