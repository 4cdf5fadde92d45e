"""Logs carry the claim and device they are about, in plain text and in JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by a new interpreter: what it imports at start is its own."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_loguru_is_loaded_by_the_first_message_in_the_format_set_before():
    proc = _python(
        """
        import sys
        from dra_core import logger
        from dra_core.logs import configure_logging

        configure_logging("INFO", "json")
        print("loaded before the first message:", "loguru" in sys.modules)
        logger.bind(claim="0b7f0c7e").info("first")
        logger.debug("hidden at INFO")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded before the first message: False"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # loguru's own default handler was never used
    record = json.loads(lines[0])["record"]
    assert (record["message"], record["extra"]["claim"]) == ("first", "0b7f0c7e")


def test_a_plugin_that_imports_loguru_itself_logs_in_the_format_set_once_registered():
    proc = _python(
        """
        from dra_core.logs import configure_logging
        from dra_core.plugins import from_objects

        configure_logging("INFO", "json")
        from loguru import logger  # the plugin module's own import

        class Plugin:
            pass

        from_objects("acme", Plugin())
        logger.info("from the plugin")
        """
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stderr.strip().splitlines()[-1])["record"]
    assert record["message"] == "from the plugin"


def test_a_set_up_made_after_loguru_is_loaded_applies_at_once(capsys):
    """The usual case in one process: a second configure_logging changes the format now."""
    from dra_core import logger

    configure_logging("INFO", "plain")
    logger.info("plain")
    configure_logging("INFO", "json")
    logger.info("json")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("plain") and not lines[0].startswith("{")
    assert json.loads(lines[1])["record"]["message"] == "json"
