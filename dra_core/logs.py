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


def configure_logging(level: str = "INFO", fmt: LogFormat = "plain") -> None:
    """Send logs to stderr at ``level`` in the chosen format; replaces earlier set-up."""
    logger.remove()
    if fmt == "json":
        logger.add(sys.stderr, level=level.upper(), serialize=True)
    else:
        logger.configure(patcher=_context)
        logger.add(sys.stderr, level=level.upper(), format=_PLAIN, colorize=None)
