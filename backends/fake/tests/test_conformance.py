"""The fake backend passes the conformance suite of dra_core.testing, on its built-in
inventory (whole devices, partitions sharing counters, a shared device), with health driven
through its control file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from dra_core.testing.conformance import AgentUnderTest, BackendConformance

EXAMPLES = Path(__file__).parents[3] / "examples" / "fake"


class TestFakeConformance(BackendConformance):
    backend = "fake"
    valid_config = {"apiVersion": "fake.dra-core.dev/v1", "kind": "FakeConfig"}
    examples = sorted(EXAMPLES.glob("*.yaml"))

    @pytest.fixture(scope="class")
    @classmethod
    def backend_args(cls, tmp_path_factory: pytest.TempPathFactory) -> Sequence[str]:
        control = tmp_path_factory.mktemp("fake-control") / "control.yaml"
        return ("--control-file", str(control), "--control-interval", "0.2")

    def set_health(self, agent: AgentUnderTest, device: str, healthy: bool) -> bool:
        control = Path(agent.extra_args[1])  # the backend_args above
        unhealthy = {} if healthy else {device: "conformance: made unhealthy"}
        temporary = control.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump({"unhealthy": unhealthy}))
        temporary.replace(control)
        return True
