"""Child output as log records: each line of llama-server's or vLLM's output gets the level it
was written at, and the routine lines each request makes (slot progress, timings, access lines,
throughput reports) go to DEBUG unless the model's ``child_log`` is ``verbose``.

llama-server (b6xxx+) writes ``<uptime> <L> <module> <function>: text`` with L one of
D/I/W/E (``0.12.008.971 I slot launch_slot_: id  1 | task 0 | processing task``); older builds
drop the uptime and level (``slot launch_slot_: id 0 | ...``). vLLM writes Python logging
lines ``[(<Proc> pid=N) ]LEVEL MM-DD HH:MM:SS [file.py:N] text`` and uvicorn's access lines
``[(<Proc> pid=N) ]INFO:     127.0.0.1:PORT - "POST /v1/... HTTP/1.1" 200 OK``. A line in no
known form (a traceback's body, a C++ abort) takes the level of the line before it when that was
a warning or an error, so a traceback stays together at ERROR.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

ChildLogMode = Literal["quiet", "verbose"]

_LLAMA = re.compile(r"^\s*\d+\.\d+\.\d+\.\d+ ([DIWEN]) (\w+):?\s*(\S*)")
_LLAMA_BARE = re.compile(r"^(slot|srv|que|main|load|llama_\w+|common_\w+|cmn|init)\s+(\S+?):")
_LLAMA_LEVELS = {"D": logging.DEBUG, "I": logging.INFO, "N": logging.INFO, "W": logging.WARNING, "E": logging.ERROR}
# Per request: slot selection, progress, timings, release; the server's request log and queue.
_LLAMA_ROUTINE_MODULES = frozenset({"slot", "que"})
_LLAMA_ROUTINE_SRV = re.compile(
    r"^(log_server_r|update_slots|params_from_|cancel_tasks|handle_comple|send_final_r|send_partial|"
    r"process_singl|get_availabl|launch_slot_)"
)

_PROC_PREFIX = re.compile(r"^\(\S+ pid=\d+\)\s?")
_CONTINUATION = re.compile(r"^(\s|Traceback \(|[\w.]*(Error|Exception|Interrupt|Exit)\b|\^+\s*$|During handling)")
_VLLM = re.compile(r"^(?:\(\S+ pid=\d+\)\s+)?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)(?::|\s)\s*(.*)$")
_VLLM_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
                "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
_VLLM_ROUTINE = re.compile(
    r'\d+\.\d+\.\d+\.\d+:\d+ - "|\[::1?\]:\d+ - "|Avg prompt throughput|Received request|Added request|'
    r"Finished request|Generated response|Aborted request|Engine \d+: Avg"
)


class ChildLog:
    """The level of each line of one child's stream (one per stream: it remembers the last level)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._last = logging.INFO

    def level(self, line: str, mode: ChildLogMode = "quiet") -> int:
        found = self._llama(line) if self.backend == "llama-server" else self._vllm(line)
        if found is None:
            # A continuation (a traceback's lines, an indented detail) of a warning or an error
            # keeps its level; any other unknown line is INFO.
            text = _PROC_PREFIX.sub("", line)
            if self._last >= logging.WARNING and _CONTINUATION.match(text):
                return self._last
            self._last = logging.INFO
            return logging.INFO
        level, routine = found
        self._last = level
        if routine and level == logging.INFO and mode == "quiet":
            return logging.DEBUG
        return level

    @staticmethod
    def _llama(line: str) -> tuple[int, bool] | None:
        m = _LLAMA.match(line)
        if m is not None:
            letter, module, function = m.groups()
            return _LLAMA_LEVELS[letter], _llama_routine(module, function)
        m = _LLAMA_BARE.match(line)
        if m is not None:
            module, function = m.groups()
            lowered = line.lower()
            if "error" in lowered or "failed" in lowered:
                return logging.ERROR, False
            if "warning" in lowered:
                return logging.WARNING, False
            return logging.INFO, _llama_routine(module, function)
        return None

    @staticmethod
    def _vllm(line: str) -> tuple[int, bool] | None:
        m = _VLLM.match(line)
        if m is None:
            return None
        level, text = m.groups()
        return _VLLM_LEVELS[level], bool(_VLLM_ROUTINE.search(text))


def _llama_routine(module: str, function: str) -> bool:
    return module in _LLAMA_ROUTINE_MODULES or (module == "srv" and bool(_LLAMA_ROUTINE_SRV.match(function)))
