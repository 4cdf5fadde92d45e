"""``dra-core run`` serves the kubelet's registration socket before it imports what only the
later steps need: the sooner the kubelet can register the driver, the sooner its prepares
come, and they wait at the agent's gate until the backend has started.
"""

from __future__ import annotations

import json
import subprocess

from dra_core.checkpoint import FILE_NAME, Checkpoint
from dra_core.runtime import AgentSettings
from dra_core.testing.startup import until_serving

#: Modules an agent that restarts must not import before its registration socket serves:
#: loguru (and asyncio, which it imports) until the first message, the API client and the
#: claim service until the backend has started, the metrics until then too, the checkpoint's
#: repair (the ``dra-core checkpoint`` command's) at all.
LATER = (
    "asyncio",
    "loguru",
    "kubernetes",
    "pydantic",
    "prometheus_client",
    "yaml",
    "dra_core.kube.client",
    "dra_core.node.service",
    "dra_core.cdi",
    "dra_core.metrics",
    "dra_core.checkpoint.repair",
)


def test_a_restarted_agent_serves_the_kubelet_before_it_imports_the_later_steps(tmp_path):
    settings = AgentSettings.below(tmp_path, "node-a")
    checkpoint = settings.plugin_dir("fake.dra-core.dev") / FILE_NAME
    Checkpoint.open(checkpoint)  # the agent's earlier run made it
    argv = ["run", "--backend", "fake", "--http-port", "0", "--no-publish"]
    argv += ["--node-name", "node-a", "--registration-dir", str(settings.registration_dir)]
    argv += ["--plugins-dir", str(settings.plugins_dir), "--cdi-dir", str(settings.cdi_dir)]
    proc = subprocess.run(
        until_serving(argv, report=LATER),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], proc.stderr
