"""The doctor's settings, its report (text for people, JSON for tools), and the runner that
fills the report from every check, the backend's included."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dra_core.doctor.cluster import cluster_checks
from dra_core.doctor.directories import directory_checks
from dra_core.doctor.runtime import DEFAULT_CONTAINERD_CONFIG, DEFAULT_CRIO_CONFIG, runtime_checks
from dra_core.hookspecs import CheckStatus, DoctorCheck, NodeContext
from dra_core.model import Inventory, ModelError, validate_inventory
from dra_core.plugins import HookError, Hooks
from dra_core.runtime import AgentSettings, resolve_identity
from dra_core.slices.features import FEATURES, used_fields

__all__ = ("DoctorReport", "DoctorSettings", "Section", "run_doctor")


@dataclass(frozen=True)
class DoctorSettings:
    """Where to look: the agent's settings (with the agent's defaults), and the container
    runtime's files and socket."""

    node_name: str
    #: Override of the backend's driver name, as for ``run``.
    driver_name: str | None = None
    #: Kubeconfig file; None means ``$KUBECONFIG`` or the in-cluster service account.
    kubeconfig: str | None = None
    registration_dir: Path = AgentSettings.registration_dir
    plugins_dir: Path = AgentSettings.plugins_dir
    cdi_dir: Path = AgentSettings.cdi_dir
    containerd_config: Path = DEFAULT_CONTAINERD_CONFIG
    crio_config: Path = DEFAULT_CRIO_CONFIG
    #: The container runtime's CRI socket; None asks the default sockets that exist.
    runtime_socket: Path | None = None
    backend_options: Mapping[str, str | None] = field(default_factory=dict)
    backend_config: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds each API request and CRI call may take.
    timeout: float = 10.0


@dataclass(frozen=True)
class Section:
    """A titled group of checks in the report."""

    title: str
    checks: tuple[DoctorCheck, ...]


_MARKS: Mapping[CheckStatus, str] = {
    "ok": "[ok]",
    "warn": "[warn]",
    "fail": "[FAIL]",
    "skip": "[skip]",
}
_WIDTH = 100


@dataclass(frozen=True)
class DoctorReport:
    """Every check, by section, for one node and driver."""

    node_name: str
    driver_name: str
    backend: str
    sections: tuple[Section, ...]

    @property
    def checks(self) -> tuple[DoctorCheck, ...]:
        return tuple(c for s in self.sections for c in s.checks)

    def count(self, status: CheckStatus) -> int:
        return sum(1 for c in self.checks if c.status == status)

    @property
    def failed(self) -> bool:
        """Whether any check failed (warnings do not fail)."""
        return self.count("fail") > 0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node_name,
            "driver": self.driver_name,
            "backend": self.backend,
            "ok": not self.failed,
            "counts": {status: self.count(status) for status in _MARKS},
            "sections": [
                {
                    "title": s.title,
                    "checks": [
                        {"name": c.name, "status": c.status, "found": c.found, "fix": c.fix}
                        for c in s.checks
                    ],
                }
                for s in self.sections
            ],
        }

    def render_text(self) -> str:
        """The report for people: a mark per check, what was found, and the fix."""
        lines = [
            f"dra-core doctor: node {self.node_name}, driver {self.driver_name} "
            f"(backend {self.backend})"
        ]
        for section in self.sections:
            lines += ["", section.title]
            for check in section.checks:
                mark = f"  {_MARKS[check.status]:<7}"
                lines += _wrap(f"{check.name}: {check.found}", mark, " " * len(mark))
                if check.fix and check.status != "ok":
                    lines += _wrap(check.fix, " " * len(mark) + "fix: ", " " * (len(mark) + 5))
        counts = (
            f"{self.count('fail')} failed, {_count(self.count('warn'), 'warning')}, "
            f"{self.count('ok')} ok, {self.count('skip')} skipped"
        )
        verdict = (
            "fix what failed: the agent, or claims on this node, will not work until then"
            if self.failed
            else "nothing failed"
        )
        lines += ["", *_wrap(f"{counts}: {verdict}", "", "")]
        return "\n".join(lines)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    """Lines of at most 100 characters, never breaking a path or a word at a hyphen."""
    return textwrap.wrap(
        text,
        _WIDTH,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def run_doctor(settings: DoctorSettings, hooks: Hooks) -> DoctorReport:
    """Run every check for this node with the loaded backend and return the report."""
    driver = resolve_identity(hooks, settings.driver_name).driver_name
    context = NodeContext(
        node_name=settings.node_name,
        driver_name=driver,
        options=settings.backend_options,
        config=settings.backend_config,
    )
    by_plugin: dict[str, list[DoctorCheck]] = {}
    for plugin, check in hooks.doctor_checks(context):
        by_plugin.setdefault(plugin, []).append(check)
    backend_checks = by_plugin.pop(hooks.backend, [])
    # Before the cluster's checks: they name the devices the agent would leave out.
    discovery, inventory = _discovery_check(hooks, context)
    api, kubelet, node_runtime = cluster_checks(
        kubeconfig=settings.kubeconfig,
        node_name=settings.node_name,
        driver=driver,
        inventory=inventory,
        timeout=settings.timeout,
    )
    runtime = runtime_checks(
        socket=settings.runtime_socket,
        node_runtime=node_runtime,
        containerd_config=settings.containerd_config,
        crio_config=settings.crio_config,
        cdi_dir=settings.cdi_dir,
        timeout=settings.timeout,
    )
    sections = [
        Section("API server", tuple(api)),
        Section("kubelet", (kubelet,)),
        Section("container runtime", tuple(runtime)),
        Section("directories", tuple(directory_checks(settings, driver))),
        Section(f"backend {hooks.backend}", (*backend_checks, discovery)),
        *(Section(f"plugin {plugin}", tuple(checks)) for plugin, checks in by_plugin.items()),
    ]
    return DoctorReport(settings.node_name, driver, hooks.backend, tuple(sections))


def _discovery_check(hooks: Hooks, context: NodeContext) -> tuple[DoctorCheck, Inventory | None]:
    """Start, discover and stop as ``dra-core discover`` does; the inventory discovered."""
    name = "discovery"
    try:
        hooks.start(context)
        try:
            inventory = hooks.discover(context)
            validate_inventory(inventory)
        finally:
            hooks.stop(context)
    except (HookError, ModelError) as exc:
        fix = (
            "the agent would not start, or would publish nothing: fix what the message and the "
            "checks above name ('dra-core discover' shows the same)"
        )
        return DoctorCheck.fail(name, str(exc), fix), None
    used = used_fields(inventory)
    features = [f.name for f in FEATURES if used & set(f.fields)]
    found = (
        f"{_count(len(inventory.devices), 'device')}, "
        f"{_count(len(inventory.counter_sets), 'counter set')}; "
        f"uses {', '.join(features) if features else 'no optional feature'}"
    )
    if not inventory.devices:
        fix = "the agent would publish no device: see the backend's checks above"
        return DoctorCheck.warn(name, found, fix), inventory
    return DoctorCheck.ok(name, found), inventory
