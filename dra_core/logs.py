"""Log set-up: loguru to stderr, plain for people or JSON for log pipelines.

Records carry the claim UID and device as ``extra`` fields (``logger.bind(claim=...)``); the
plain format shows them, and JSON keeps them as fields.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from loguru import logger

__all__ = ("LogFormat", "configure_logging")

LogFormat = Literal["plain", "json"]

_PLAIN = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "{extra[context]}<level>{message}</level>"
)


def _context(record: Any) -> None:
    extra = record["extra"]
    parts = [f"{key}={extra[key]}" for key in ("claim", "device") if key in extra]
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


def configure_logging(level: str = "INFO", fmt: LogFormat = "plain") -> None:
    """Send logs to stderr at ``level`` in the chosen format; replaces earlier set-up."""
    logger.remove()
    if fmt == "json":
        logger.add(_CurrentStderr(), level=level.upper(), serialize=True)
    else:
        logger.configure(patcher=_context)
        logger.add(_CurrentStderr(), level=level.upper(), format=_PLAIN, colorize=None)
