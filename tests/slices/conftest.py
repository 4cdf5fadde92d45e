"""Fixtures of the slice tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger


@pytest.fixture
def caplog_loguru() -> Iterator[list[str]]:
    """Messages logged through loguru while the test runs."""
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(str(m)), level="DEBUG", format="{message}")
    try:
        yield messages
    finally:
        logger.remove(handler)
