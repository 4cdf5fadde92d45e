"""Unit checks of what the own-node admission policy binds besides the node (the driver name
and the pool name) and of the listen addresses the manifests set; the policy's behaviour on a
real API server is in test_deploy_controlplane.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dra_core import plugins
from tests.deploy import kustomize

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
AGENT_KUSTOMIZATIONS = ["base", "overlays/fake", "overlays/i915"]


def _one(objects, kind):
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def policy_driver(objects) -> str:
    """The driver name the policy's ``driverName`` variable names (a CEL string literal)."""
    policy = _one(objects, "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    literal = variables["driverName"]
    assert literal.startswith("'") and literal.endswith("'") and literal.count("'") == 2, literal
    return literal[1:-1]


def agent_driver(objects) -> str:
    """The driver the DaemonSet's agent serves: --driver-name / DRA_DRIVER_NAME, or its
    backend's default."""
    ds = _one(objects, "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if "--driver-name" in args:
        return str(args[args.index("--driver-name") + 1])
    if env.get("DRA_DRIVER_NAME"):
        return str(env["DRA_DRIVER_NAME"])
    backend = args[args.index("--backend") + 1]
    return str(plugins.load(backend).backend_identity().driver_name)


@pytest.mark.parametrize("directory", AGENT_KUSTOMIZATIONS)
def test_the_policy_names_the_driver_its_agent_serves(directory):
    """Each installable set of manifests binds the agent's ServiceAccount to the driver its
    DaemonSet runs: an overlay that changes the backend without the policy fails here."""
    objects = kustomize.build(DEPLOY / directory)
    assert policy_driver(objects) == agent_driver(objects)


def test_the_i915_overlay_rebinds_the_driver_and_nothing_else():
    base = _one(kustomize.build(DEPLOY / "base"), "ValidatingAdmissionPolicy")
    i915 = _one(kustomize.build(DEPLOY / "overlays/i915"), "ValidatingAdmissionPolicy")
    assert policy_driver([base]) == "fake.dra-core.dev"
    assert policy_driver([i915]) == "gpu.intel.com"
    i915["spec"]["variables"][0] = base["spec"]["variables"][0]
    assert i915 == base


def test_the_overlay_patch_refuses_a_moved_variable():
    """The overlay's ``test`` operation makes the build fail, rather than rewrite another
    variable, if driverName is no longer the first one."""
    policy = _one(kustomize.build(DEPLOY / "base"), "ValidatingAdmissionPolicy")
    policy["spec"]["variables"].reverse()
    ops = yaml.safe_load((DEPLOY / "overlays/i915/policy-driver.yaml").read_text())
    with pytest.raises(kustomize.PatchTestFailed):
        kustomize.json_patch(policy, ops)


def test_the_policy_checks_driver_and_pool_of_new_and_old_slices():
    policy = _one(kustomize.build(DEPLOY / "base"), "ValidatingAdmissionPolicy")
    expressions = [v["expression"] for v in policy["spec"]["validations"]]
    text = "\n".join(expressions)
    for field in ("object.spec.?driver", "object.spec.?pool.?name"):
        assert field in text
        assert f"old{field[0].upper()}{field[1:]}" in text
    assert all(v.get("reason") == "Forbidden" for v in policy["spec"]["validations"])
    assert all(
        v.get("message") or v.get("messageExpression") for v in policy["spec"]["validations"]
    )


def test_json_patch_test_operation():
    doc = {"a": [{"name": "x"}]}
    assert kustomize.json_patch(doc, [{"op": "test", "path": "/a/0/name", "value": "x"}]) == doc
    for path, value in (("/a/0/name", "y"), ("/a/1/name", "x"), ("/b", 1)):
        with pytest.raises((kustomize.PatchTestFailed, IndexError, KeyError)):
            kustomize.json_patch(doc, [{"op": "test", "path": path, "value": value}])


def test_the_webhook_listens_on_its_pod_ip():
    objects = kustomize.build(DEPLOY / "webhook")
    deployment = _one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DRA_WEBHOOK_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    cli = (DEPLOY.parent / "dra_core" / "cli.py").read_text()
    assert '"DRA_WEBHOOK_HOST"' in cli
