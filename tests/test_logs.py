"""Logs carry the claim and device they are about, in plain text and in JSON."""

from __future__ import annotations

import json

from loguru import logger

from dra_core.logs import configure_logging


def test_plain_logs_show_claim_and_device(capsys):
    configure_logging("INFO", "plain")
    logger.bind(claim="0b7f0c7e", device="gpu-0").warning("prepare failed")
    logger.debug("hidden at INFO")
    err = capsys.readouterr().err
    assert "[claim=0b7f0c7e device=gpu-0] prepare failed" in err
    assert "hidden" not in err


def test_json_logs_are_one_object_per_line(capsys):
    configure_logging("DEBUG", "json")
    logger.bind(claim="0b7f0c7e").info("prepared")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)["record"]
    assert record["message"] == "prepared"
    assert record["extra"]["claim"] == "0b7f0c7e"
    assert record["level"]["name"] == "INFO"


def test_logs_follow_stderr_when_it_is_replaced(monkeypatch):
    """A handler writes to the stderr of the moment, never to one replaced and closed since."""
    import io
    import sys

    from loguru import logger

    from dra_core.logs import configure_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("INFO")
    logger.info("to the first")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logger.info("to the second")
    assert "to the second" in second.getvalue()
