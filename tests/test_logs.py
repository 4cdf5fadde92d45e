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


def test_standard_logging_records_take_the_agents_format_and_level(capsys):
    """A backend that logs with the standard logging module gets the agent's JSON and level."""
    import logging

    configure_logging("DEBUG", "json")
    logging.getLogger("acme.backend").debug("probing %s", "npu-0")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)["record"]
    assert record["message"] == "probing npu-0"
    assert record["level"]["name"] == "DEBUG"
    assert record["extra"]["logger"] == "acme.backend"
    assert record["function"] == "test_standard_logging_records_take_the_agents_format_and_level"

    configure_logging("WARNING", "plain")
    logging.getLogger("acme.backend").info("hidden at WARNING")
    logging.getLogger("acme.backend").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "[logger=acme.backend] shown" in err
