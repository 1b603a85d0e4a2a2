"""Logging: one line per event, with the stream, the client and the reason.

`event(logger, level, text, stream=..., client=..., reason=...)` writes
`text stream=live/a client=1.2.3.4:5 reason="..."` in text mode and one JSON
object per line with those keys in json mode.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

RATE_LIMIT = 10
"""Lines per second per (logger, message) for the loggers in RATE_LIMITED;
the rest are counted and the next line that passes says how many were dropped."""
RATE_LIMITED = ("aiohttp", "mediaserver.http")
"""Loggers whose lines a remote client can cause at will (refused requests,
refused connections): an attacker must not be able to flood the log. (WHIP
limits its own refusal lines: its per-publish lines must all be kept.)"""


def event(logger: logging.Logger, level: int, text: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, text, extra={"fields": fields})


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "='):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            body.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


class ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request as an ERROR with the parser's whole traceback.

    A bad request is the client's fault: it becomes one INFO line with the
    reason (the exception's text) and no traceback. Errors that are not
    HTTP-parsing errors (a bug in a handler) keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not record.getMessage().startswith("Error handling request"):
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        if not isinstance(exc, (HttpProcessingError, ConnectionError)):
            return True
        client = record.args[0] if isinstance(record.args, tuple) and record.args else None
        text = getattr(exc, "message", None) or str(exc)
        # aiohttp's text spans lines with a caret under the bad byte: one line, without the caret.
        reason = " ".join(p.strip() for p in str(text).splitlines() if p.strip() and set(p.strip()) != {"^"})
        record.msg = "bad HTTP request refused"
        record.args = ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = None
        record.exc_text = None
        record.fields = {"client": client, "reason": f"{type(exc).__name__}: {reason}"}
        # The logger let it through as an ERROR; as INFO it must pass the level again.
        return logging.getLogger().isEnabledFor(logging.INFO)


class RateLimitFilter(logging.Filter):
    """At most `per_second` lines per (logger, message) from the loggers named in `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...] = RATE_LIMITED, per_second: int = RATE_LIMIT) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.per_second = per_second
        self.windows: dict[tuple[str, str], list[float]] = {}
        """(window start, lines passed in it, lines suppressed since the last one passed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if record.levelno >= logging.ERROR or not any(
            name == p or name.startswith(p + ".") for p in self.prefixes
        ):
            return True
        key = (name, str(record.msg))
        now = record.created
        window = self.windows.get(key)
        if window is None or now - window[0] >= 1.0:
            if len(self.windows) > 4096:
                self.windows = {k: w for k, w in self.windows.items() if now - w[0] < 1.0 or w[2]}
            suppressed = window[2] if window is not None else 0
            window = self.windows[key] = [now, 0, suppressed]
        if window[1] >= self.per_second:
            window[2] += 1
            return False
        window[1] += 1
        if window[2]:
            fields = dict(getattr(record, "fields", None) or {})
            fields["suppressed"] = int(window[2])
            record.fields = fields
            window[2] = 0
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ClientErrorFilter())
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per segment request: too loud at info.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # ICE state changes per candidate pair: debugging detail, not operations.
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
