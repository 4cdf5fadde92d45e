"""`dra-core run` stops on SIGTERM whichever of its threads the signal is delivered to."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dra_core.testing.kubelet import FakeKubelet

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def _tgkill(pid: int, tid: int, signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.skipif(SYS_TGKILL is None, reason="tgkill's syscall number is not known here")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_another_thread_stops_the_agent(tmp_path: Path, signum: int) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish",
         "--http-port", "0", "--registration-dir", str(tmp_path / "reg"),
         "--plugins-dir", str(tmp_path / "plugins"), "--cdi-dir", str(tmp_path / "cdi")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
            assert time.monotonic() < deadline, "the agent did not answer GetInfo within 30 s"
            sockets = list((tmp_path / "reg").glob("*-reg.sock"))
            if sockets:
                try:
                    with FakeKubelet(sockets[0]) as kubelet:
                        kubelet.get_info(timeout=1)
                    break
                except Exception:  # noqa: BLE001 - not serving yet
                    pass
            time.sleep(0.05)
        threads = sorted(int(t) for t in os.listdir(f"/proc/{agent.pid}/task"))
        others = [t for t in threads if t != agent.pid]
        assert others, "the agent runs several threads"
        for thread in reversed(others):  # a connection's thread may have ended since the list
            try:
                _tgkill(agent.pid, thread, signum)
                break
            except ProcessLookupError:
                continue
        else:
            pytest.fail(f"none of the agent's threads {others} is left to signal")
        output, _ = agent.communicate(timeout=15)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate(timeout=15)
    assert agent.returncode == 0, output
    assert f"received {signal.Signals(signum).name}, stopping" in output


#: Runs ``dra-core run`` whose import of loguru signals the agent itself with SIGTERM: the
#: handler runs in the main thread while it loads the logger (dra_core.lazylog).
SIGNALLED_WHILE_LOADING_THE_LOGGER = """
import importlib.abc, os, signal, sys

class SignalAtLoguru(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "loguru":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None  # the real finders import it

sys.meta_path.insert(0, SignalAtLoguru())
from dra_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_while_the_agent_loads_its_logger_stops_it(tmp_path: Path) -> None:
    """The SIGTERM handler does not log: it may run while the main thread holds the logger's
    loading lock, which a message from the handler would wait for forever."""
    agent = subprocess.run(
        [sys.executable, "-c", SIGNALLED_WHILE_LOADING_THE_LOGGER, "run", "--backend", "fake",
         "--no-publish", "--http-port", "0", "--registration-dir", str(tmp_path / "reg"),
         "--plugins-dir", str(tmp_path / "plugins"), "--cdi-dir", str(tmp_path / "cdi")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr
    assert "received SIGTERM, stopping" in agent.stderr
    assert "stopped (pid" in agent.stderr
