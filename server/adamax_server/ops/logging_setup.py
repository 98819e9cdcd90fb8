"""Log setup for the server: readable text, or one JSON object a line for log collectors.

Records may carry ``optimizer``, ``worker`` and ``version`` (``logger.info(..., extra={...})``);
the JSON format writes them as fields, the text format appends them as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

CONTEXT_FIELDS = ("optimizer", "worker", "version", "reason", "checkpoint")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ..., "optimizer": ...}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The usual one-line format, plus the context fields a record carries."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{n}={getattr(record, n)}" for n in CONTEXT_FIELDS if getattr(record, n, None) not in (None, "")]
        return f"{line} [{' '.join(extras)}]" if extras else line


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root handlers with one writing ``fmt`` ("text" or "json") to stderr."""
    if fmt not in FORMATS:
        raise ValueError(f"`log_format` must be one of {list(FORMATS)}. Received: log_format={fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
