"""The agent's container image, built from deploy/Dockerfile, holds what it says and runs on
the real node's containerd and runc.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.controlplane import helpers
from tests.realnode import pods
from tests.realnode.agent_image import Mounted, config

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

_SITE = "opt/dra-core/lib/python3.11/site-packages"
_NOTICE = re.compile(r"LICEN[CS]E|COPYING|NOTICE|AUTHORS", re.IGNORECASE)


def _dist_infos(root: Path) -> dict[str, tuple[str, Path]]:
    """Distribution name -> its version and dist-info directory, read from the image."""
    found = {}
    for info in (root / _SITE).glob("*.dist-info"):
        meta = (info / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name: (.+)$", meta, re.MULTILINE)
        version = re.search(r"^Version: (.+)$", meta, re.MULTILINE)
        assert name and version, f"{info} has no Name or Version"
        found[name.group(1).strip()] = (version.group(1).strip(), info)
    return found


@pytest.mark.timeout(900)  # the first build makes the Debian base too
def test_image_runs_the_agent_without_a_shell_and_ships_every_licence(agent_image, capsys):
    with capsys.disabled():
        print(f"\n[image] {agent_image.name}: {agent_image.size / 2**20:.0f} MiB as layers")
    image_config = config(agent_image)
    assert image_config["Entrypoint"] == ["/opt/dra-core/bin/dra-core"]  # exec form: no shell
    assert image_config["User"] == "0:0"
    with Mounted(agent_image) as root:
        # The console script starts the environment's Python itself.
        first_line = (root / "opt/dra-core/bin/dra-core").read_text().splitlines()[0]
        assert first_line == "#!/opt/dra-core/bin/python3"
        dists = _dist_infos(root)
        assert {"dra-core", "dra-backend-fake", "dra-backend-i915", "grpcio"} <= set(dists)
        assert "pip" not in dists and "setuptools" not in dists  # build-time only
        assert not (root / _SITE / "kubernetes" / "aio").exists()
        licences = root / "usr/share/licenses/dra-core"
        index = (licences / "INDEX").read_text().splitlines()
        listed = {line.split(" ", 1)[0] for line in index}
        assert listed == set(dists), "every distribution in the image is accounted for"
        for name, (version, info) in dists.items():
            notices = [p for p in info.rglob("*") if p.is_file() and _NOTICE.search(p.name)]
            copied = [p for p in (licences / f"{name}-{version}").rglob("*") if p.is_file()]
            assert len(copied) == len(notices), f"{name}: {copied} against {notices}"
        assert any(p.name == "LICENSE" for p in licences.glob("dra-core-*/**/*"))


@pytest.mark.timeout(900)
def test_image_runs_on_the_real_node(agent_image, real_node, kube_api, namespace):
    real_node.import_image(agent_image.archive)
    body = pods.pod_body("image", real_node.name, {})
    container = body["spec"]["containers"][0]
    container.update(image=agent_image.name, args=["backends"])
    del container["command"]  # the image's own entrypoint
    helpers.create_pod(kube_api, namespace, body)

    def finished() -> bool:
        current, why = pods.phase(kube_api, namespace, "image")
        assert current != "Failed", why
        return current == "Succeeded"

    helpers.wait_for(finished, 90, "the image's pod to finish")
    log = real_node.container_log(namespace, "image", "c")
    assert "fake" in log and "i915" in log, log
