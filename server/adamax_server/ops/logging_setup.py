"""Log setup for the server: readable text, or one JSON object a line for log collectors.

Records may carry ``optimizer``, ``worker`` and ``version`` (``logger.info(..., extra={...})``);
the JSON format writes them as fields, the text format appends them as ``key=value``. Records
may also carry machine-readable fields for JSON only (``event``, ``host``, ``port``, ``device``:
the "listening" record says where the server listens).

Everything the process itself writes goes through this handler once it is configured: Python
warnings (``logging.captureWarnings``) and uncaught exceptions of any thread (``sys.excepthook``,
``threading.excepthook``) become records too, so a JSON log has no plain-text lines. gRPC's C
core logs on its own; ``adamax-ps`` turns it off in JSON mode unless ``GRPC_VERBOSITY`` is set
(see ``adamax_server.cli.commands.main``).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, TextIO

CONTEXT_FIELDS = ("optimizer", "worker", "version", "reason", "checkpoint")
JSON_FIELDS = ("event", "host", "port", "device")
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_state = {"format": None}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ..., "optimizer": ...}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS + JSON_FIELDS:
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


def current_format() -> str | None:
    """"text" or "json" once :func:`configure_logging` ran, else None."""
    return _state["format"]


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any, where: str) -> None:
    logging.getLogger("adamax_server").critical("uncaught exception in %s", where, exc_info=(exc_type, exc, tb))


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root handlers with one writing ``fmt`` ("text" or "json") to stderr."""
    if fmt not in FORMATS:
        raise ValueError(f"`log_format` must be one of {list(FORMATS)}. Received: log_format={fmt!r}")
    if str(level).upper() not in LEVELS:
        raise ValueError(f"`log_level` must be one of {list(LEVELS)}. Received: log_level={level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _state["format"] = fmt
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger, in this format

    def thread_hook(hook_args: threading.ExceptHookArgs) -> None:
        if hook_args.exc_type is SystemExit:
            return
        name = hook_args.thread.name if hook_args.thread is not None else "a thread"
        _log_uncaught(hook_args.exc_type, hook_args.exc_value, hook_args.exc_traceback, f"thread {name}")

    threading.excepthook = thread_hook
    sys.excepthook = lambda t, e, tb: _log_uncaught(t, e, tb, "the main thread")
