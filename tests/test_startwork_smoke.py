"""benchmarks/startwork.py counts the instructions of a start up to the registration socket:
the agent it runs under callgrind stops there, and the count is read. No count is asserted
but their order: the figures are measured with ``python3 benchmarks/startwork.py``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from dra_core.checkpoint import FILE_NAME, Checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_the_restart_of_an_agent_is_counted_until_it_serves(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as its scripts import each other
    import startwork

    Checkpoint.open(tmp_path / "plugins" / "fake.dra-core.dev" / FILE_NAME)  # a restart
    restart = startwork.instructions(startwork.start_command(sys.executable, tmp_path), tmp_path)
    alone = startwork.instructions([sys.executable, "-c", "pass"], tmp_path)
    assert 0 < alone < restart
    assert list((tmp_path / "registry").glob("*-reg.sock")), "it stopped before serving"
