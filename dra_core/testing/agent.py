"""A node agent started for a test, with its directories below a short temporary directory.

:func:`start_agent` starts it, by default in the test's own process (any backend: an installed
entry-point name, or backend objects, classes and factories as
:func:`dra_core.plugins.from_objects` takes them), or with ``process=True`` as
``python -m dra_core run``, the way an operator runs it (an installed backend only; the way to
test a restart or a crash). It returns once the agent answers the kubelet's ``GetInfo``. The
``dra_agent`` fixture of :mod:`dra_core.testing.plugin` calls it and stops the agent after the
test; so does the conformance suite.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dra_core.kubelet.sockets import SocketPaths
from dra_core.plugins import Hooks, from_objects, load
from dra_core.runtime import Agent, AgentSettings, resolve_identity
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import wait_for

__all__ = ("DRA_CORE_PROGRAM", "RunningAgent", "backend_flags", "start_agent")

#: The interpreter arguments of ``dra-core`` itself (``python -m dra_core``).
DRA_CORE_PROGRAM = ("-m", "dra_core")
#: Seconds an agent has to answer ``GetInfo`` after it was started.
START_TIMEOUT = 30.0


def backend_flags(options: Mapping[str, str | None]) -> list[str]:
    """``dra-core run`` flags for backend option values keyed as ``AgentSettings`` keys them
    (``_`` for ``-``); options without a value are left out."""
    return [
        arg
        for key, value in options.items()
        if value is not None
        for arg in (f"--{key.replace('_', '-')}", value)
    ]


@dataclass
class RunningAgent:
    """A node agent of a test, restartable: ``agent`` is set while one runs in the test's
    process, ``proc`` while one runs as a process of its own."""

    #: The backend's name (the entry-point name, or the name given to its objects).
    backend: str
    settings: AgentSettings
    #: The driver name it serves (its sockets are named after it).
    driver: str
    #: The short temporary directory the agent's directories are in (``agent.log`` too).
    root: Path
    #: The hooks over the backend for an agent in the test's process.
    hooks: Hooks | None = None
    #: Run as ``python -m dra_core run`` (the backend must be installed) instead of in-process.
    process: bool = False
    #: More ``dra-core run`` flags for a process (e.g. backend options as flags).
    extra_args: Sequence[str] = ()
    agent: Agent | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return self.settings.node_name

    @property
    def cdi_dir(self) -> Path:
        return self.settings.cdi_dir

    @property
    def registration_socket(self) -> Path:
        """Where the kubelet finds the agent (``<registration_dir>/<driver>-reg.sock``)."""
        return SocketPaths.for_driver(
            self.driver,
            registration_dir=self.settings.registration_dir,
            plugin_dir=self.settings.plugin_dir(self.driver),
            instance_id=self.settings.instance_id,
        ).registration

    @property
    def log_path(self) -> Path:
        """The log of an agent run as a process."""
        return self.root / "agent.log"

    def argv(self, program: Sequence[str] = DRA_CORE_PROGRAM) -> list[str]:
        """The command line of the agent as a process; ``program`` replaces ``-m dra_core``:
        a script that calls ``dra_core.cli.main(backends={name: objects})`` runs the agent with
        backend objects built in it (a backend writing to a fake kernel the test serves)."""
        s = self.settings
        flags = [
            "--node-name", s.node_name,
            "--registration-dir", str(s.registration_dir),
            "--plugins-dir", str(s.plugins_dir),
            "--cdi-dir", str(s.cdi_dir),
            "--http-port", str(s.http_port),
            "--poll-interval", str(s.poll_interval),
        ]  # fmt: skip
        if s.kubeconfig is not None:
            flags += ["--kubeconfig", s.kubeconfig]
        if s.driver_name is not None:
            flags += ["--driver-name", s.driver_name]
        if s.instance_id is not None:
            flags += ["--instance-id", s.instance_id]
        return [
            sys.executable,
            *program,
            "--log-level",
            "DEBUG",
            "run",
            "--backend",
            self.backend,
            *flags,
            *backend_flags(s.backend_options),
            *self.extra_args,
        ]

    def start(self, *, program: Sequence[str] = DRA_CORE_PROGRAM) -> None:
        """Start the agent and wait until it answers ``GetInfo`` (``program``: see `argv`)."""
        if self.process:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv(program), stdout=log, stderr=subprocess.STDOUT
                )
        else:
            assert self.hooks is not None, "an agent in the test's process needs its hooks"
            self.agent = Agent(self.settings, self.hooks)
            self.agent.start()
        wait_for(f"the {self.backend} agent to answer GetInfo", self._answers, START_TIMEOUT, 0.05)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            msg = (
                f"the {self.backend} agent exited with {self.proc.returncode} "
                f"(log {self.log_path}):\n{self.log_tail()}"
            )
            raise AssertionError(msg)
        with FakeKubelet(self.registration_socket) as peer:
            peer.get_info()
        return True

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the agent (a process with ``sig``, killed after 30 s); prepared claims stay
        prepared, as after a restart of the real one."""
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kubelet(self, timeout: float = 60.0) -> FakeKubelet:
        """A `FakeKubelet` registered with the agent (close it, or use it in ``with``)."""
        peer = FakeKubelet(self.registration_socket, timeout=timeout)
        try:
            peer.register()
        except BaseException:
            peer.close()
            raise
        return peer

    def log_tail(self, chars: int = 4000) -> str:
        path = self.log_path
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def start_agent(
    backend: str | object,
    *,
    root: Path,
    node: str,
    kubeconfig: str | None,
    name: str | None = None,
    options: Mapping[str, str | None] | None = None,
    process: bool = False,
    extra_args: Sequence[str] = (),
    driver: str | None = None,
    start: bool = True,
    **settings: Any,
) -> RunningAgent:
    """Start a node agent for ``node`` with its directories below ``root`` (keep it short:
    socket paths are limited to about 100 bytes) and return it serving.

    ``backend`` is an installed backend's entry-point name, or its objects (a class, factory
    or object with hook implementations; then ``name`` names it, default ``test``);
    ``options`` are the backend's option values (``_`` for ``-``), ``settings`` other fields of
    `AgentSettings` (the poll interval defaults to 0.5 s). ``process`` runs it as
    ``python -m dra_core run`` with ``extra_args`` appended. With ``start=False`` the agent is
    returned not started yet (`RunningAgent.start` starts it). ``driver`` names the driver
    the agent serves; without it the backend is loaded in the test's process to tell (a process
    may see backends the test's process does not, e.g. through ``PYTHONPATH``).
    """
    hooks: Hooks | None = None
    if isinstance(backend, str):
        name = backend
        if not (process and driver):
            hooks = load(backend)
    else:
        if process:
            msg = "an agent run as a process needs an installed backend's entry-point name"
            raise ValueError(msg)
        name = name or "test"
        hooks = from_objects(name, backend)
    agent_settings = AgentSettings.below(
        root,
        node,
        kubeconfig=kubeconfig,
        backend_options=dict(options or {}),
        **{"poll_interval": 0.5, **settings},
    )
    if driver is None:
        assert hooks is not None  # loaded above whenever no driver is given
        driver = resolve_identity(hooks, agent_settings.driver_name).driver_name
    running = RunningAgent(
        name,
        agent_settings,
        driver,
        root,
        hooks,
        process=process,
        extra_args=tuple(extra_args),
    )
    if start:
        running.start()
    return running
