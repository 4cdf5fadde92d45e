"""The ``helm`` fixture: the Helm CLI built from its Go module (see helmcli.py).

The first build takes minutes, longer than a test's timeout, so it runs once after collection
when a collected test uses the fixture, with its output shown. Without a Go toolchain the
tests that need Helm are skipped, except in CI (``CI`` true), where they fail: CI has Go.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import pytest

from tests.deploy import helmcli

_STATE: dict[str, Any] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _provide(config: pytest.Config) -> None:
    if _STATE:
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    shown = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()

    def echo(line: str) -> None:
        if tr is not None:
            tr.write_line(f"[helm] {line}")

    t0 = time.monotonic()
    with shown:
        try:
            _STATE["binary"] = helmcli.build(echo)
        except helmcli.HelmUnavailable as exc:
            _STATE["error"] = exc
        _STATE["seconds"] = time.monotonic() - t0
        if "binary" in _STATE and _STATE["seconds"] > 5:
            echo(f"built {_STATE['binary']} in {_STATE['seconds']:.0f} s")


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("helm" in getattr(item, "fixturenames", ()) for item in session.items):
        _provide(session.config)


@pytest.fixture(scope="session")
def helm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> helmcli.Helm:
    """The Helm CLI of tests/deploy/helm/go.mod's version, with private Helm directories."""
    _provide(request.config)
    error = _STATE.get("error")
    if error is not None:
        if error.go_missing and not _in_ci():
            pytest.skip(f"the Helm CLI is built from its Go module: {error}")
        pytest.fail(f"the Helm CLI is needed for the chart tests: {error}", pytrace=False)
    return helmcli.Helm(_STATE["binary"], tmp_path_factory.mktemp("helm-home"))
