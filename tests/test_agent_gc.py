"""A running agent keeps what its start loaded out of the garbage collector's full passes:
with the API client loaded, each full pass paused the agent (and a prepare) for 20-35 ms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Runs an agent (fake backend, no API server) and, once it is ready, prints how many objects
#: are frozen and stops it with SIGTERM.
PROGRAM = """
import gc, os, signal, sys, threading, time
from pathlib import Path
from dra_core.plugins import load
from dra_core.runtime import Agent, AgentSettings

settings = AgentSettings.below(Path(sys.argv[1]), "node-1", publish=False)
agent = Agent(settings, load("fake"))
frozen_before = gc.get_freeze_count()

def report():
    deadline = time.monotonic() + 30
    while agent.readiness() or not gc.get_freeze_count():
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    print(frozen_before, gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
agent.run()
"""


def test_the_agent_freezes_what_its_start_loaded(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = map(int, done.stdout.split())
    assert before == 0
    assert after > 10_000, f"only {after} objects frozen"
