"""Log set-up: loguru to stderr, plain for people or JSON for log pipelines.

Records carry the claim UID and device (and, for a failed backend call, the plugin and hook)
as ``extra`` fields (``logger.bind(claim=...)``); the plain format shows them, and JSON keeps
them as fields. Records of the standard `logging`
module (a backend's, a library's) go the same way, at the same level, with the name of their
logger as the ``logger`` field.

The set-up is applied when loguru is loaded (`dra_core.lazylog`), which is at the first message.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Literal

from dra_core import lazylog
from dra_core.lazylog import logger

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ("LogFormat", "configure_logging")

LogFormat = Literal["plain", "json"]

_PLAIN = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "{extra[context]}<level>{message}</level>"
)


def _context(record: Any) -> None:
    extra = record["extra"]
    keys = ("logger", "claim", "device", "plugin", "hook")
    parts = [f"{key}={extra[key]}" for key in keys if key in extra]
    extra["context"] = f"[{' '.join(parts)}] " if parts else ""


class _CurrentStderr:
    """``sys.stderr`` as it is at each write, not as it was at set-up: a test runner or an
    embedding program may replace it, and a handler must not keep writing to a closed one."""

    def write(self, message: str) -> None:
        sys.stderr.write(message)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _StandardLogging(logging.Handler):
    """Hands records of the standard `logging` module to loguru, keeping where they come from."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:  # a custom level loguru does not know
            level = record.levelno

        def origin(entry: Any) -> None:
            entry.update(name=record.name, function=record.funcName, line=record.lineno)
            entry["module"] = record.module

        logger.patch(origin).bind(logger=record.name).opt(exception=record.exc_info).log(
            level, record.getMessage()
        )


def configure_logging(level: str = "INFO", fmt: LogFormat = "plain") -> None:
    """Send logs to stderr at ``level`` in the chosen format; replaces earlier set-up."""
    logging.basicConfig(handlers=[_StandardLogging()], level=level.upper(), force=True)

    def setup(loguru: Logger) -> None:
        loguru.remove()
        if fmt == "json":
            loguru.add(_CurrentStderr(), level=level.upper(), serialize=True)
        else:
            loguru.configure(patcher=_context)
            loguru.add(_CurrentStderr(), level=level.upper(), format=_PLAIN, colorize=None)

    lazylog.configure(setup)
