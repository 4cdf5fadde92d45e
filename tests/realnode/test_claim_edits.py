"""Claim-level container edits on a real kubelet and containerd: a container with two claims of
one driver, two devices each, sees each claim's own variable once, with that claim's devices.

The fake backend writes ``DRA_FAKE_CLAIM_<NAME>`` (the claim's devices) as an edit of the
whole claim: one claim device in the claim's CDI spec, whose ID every device result names.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.realnode import pods

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

FAKE = "fake.dra-core.dev"
PLAIN = [{"cel": {"expression": f'device.attributes["{FAKE}"].model == "fake-basic"'}}]


def test_two_claims_of_one_driver_each_bring_their_claim_variable_once(
    fake_agent, real_node, kube_api, namespace
):
    for name in ("pair-a", "pair-b"):
        pods.create_template(
            kube_api, namespace, pods.claim_template(name, FAKE, selectors=PLAIN, count=2)
        )
    claims = {
        "a": {"resourceClaimTemplateName": "pair-a"},
        "b": {"resourceClaimTemplateName": "pair-b"},
    }
    pods.start(kube_api, namespace, real_node, "pairs", claims)
    uids = pods.claim_uids(kube_api, namespace, "pairs")
    pods.container_view(real_node, namespace, "pairs")  # waits for the whole report
    text = real_node.container_log(namespace, "pairs", "c")
    env_lines = text.split("== env", 1)[1].split("== devices", 1)[0].strip().splitlines()

    seen: set[str] = set()
    for uid in uids.values():
        spec = pods.cdi_edits(real_node.cdi_dir, uid)
        name = spec.env["DRA_FAKE_CLAIM"].split("/", 1)[1]
        key = f"DRA_FAKE_CLAIM_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}"
        devices = spec.env[key].split(",")
        assert len(devices) == 2, spec.env
        lines = [line for line in env_lines if line.startswith(f"{key}=")]
        assert lines == [f"{key}={spec.env[key]}"], env_lines  # there, once
        seen.update(devices)
        # one claim device, named by every device result: written once in the spec
        claim_devices = [
            d for d in _spec(real_node, uid)["devices"] if d["name"].startswith("claim-")
        ]
        assert [d["name"] for d in claim_devices] == [f"claim-{uid}"]
    assert len(seen) == 4  # two claims, four distinct devices
    for key in ("DRA_FAKE_CLAIM", "DRA_FAKE_DEVICES"):  # set by both claims: once, the last
        assert len([line for line in env_lines if line.startswith(f"{key}=")]) == 1, env_lines


def _spec(node, uid: str) -> dict:
    (path,) = [p for p in node.cdi_dir.glob("*.json") if uid in p.name]
    return json.loads(path.read_text())
