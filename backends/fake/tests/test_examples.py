"""The shipped examples and the kustomize overlay agree with the backend: the inventory and
control file decode and validate, the ConfigMap carries the example inventory, the rendered
DeviceClasses are current, and the manifests name classes and configs that exist."""

from __future__ import annotations

from pathlib import Path

import dra_backend_fake.plugin
import yaml
from dra_backend_fake.config import decode
from dra_backend_fake.control import parse_control
from dra_backend_fake.inventory import build, load_file
from dra_backend_fake.testing import write_control

from dra_core.manifests import device_class_manifests
from dra_core.model import validate_inventory
from dra_core.plugins import from_objects

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "fake"
OVERLAY = ROOT / "deploy" / "overlays" / "fake"


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_example_inventory_is_valid():
    inventory = build(load_file(EXAMPLES / "inventory.yaml"))
    validate_inventory(inventory)
    names = {d.name for d in inventory.devices}
    assert {"dev-0", "dev-1", "shared-0", "big-0", "big-0-p3"} <= names


def test_configmap_carries_the_example_inventory():
    (configmap,) = _documents(OVERLAY / "inventory-configmap.yaml")
    assert configmap["metadata"]["namespace"] == "dra-core"
    text = (EXAMPLES / "inventory.yaml").read_text()
    assert configmap["data"]["inventory.yaml"] == text, (
        "deploy/overlays/fake/inventory-configmap.yaml differs from examples/fake/inventory.yaml"
    )


def test_example_control_file_applies_to_the_example_inventory(start, tmp_path, logs):
    spec = parse_control(yaml.safe_load((EXAMPLES / "control.yaml").read_text()), "example")
    assert spec.add and spec.remove and spec.unhealthy and spec.failPrepare
    control = tmp_path / "control.yaml"
    backend = start(inventory=EXAMPLES / "inventory.yaml", control_file=control)
    write_control(control, (EXAMPLES / "control.yaml").read_text())
    inventory = backend.discover()
    validate_inventory(inventory)
    assert "hot-0" in backend.names() and "dev-1" not in backend.names()
    assert set(backend.unhealthy()) == {"shared-0"}
    assert not [m for m in logs if m.startswith(("ERROR", "WARNING"))]


def test_rendered_device_classes_are_current():
    hooks = from_objects("fake", dra_backend_fake.plugin.FakePlugin)
    rendered = device_class_manifests(hooks.device_classes(hooks.backend_identity()))
    assert _documents(OVERLAY / "deviceclasses.yaml") == rendered, (
        "re-render: dra-core render --backend fake (below the header of "
        "deploy/overlays/fake/deviceclasses.yaml)"
    )


def test_manifests_name_existing_classes_and_valid_configs():
    classes = {d["metadata"]["name"] for d in _documents(OVERLAY / "deviceclasses.yaml")}
    seen = 0
    for path in sorted(EXAMPLES.glob("pod*.yaml")):
        for doc in _documents(path):
            if doc["kind"] != "ResourceClaimTemplate":
                continue
            devices = doc["spec"]["spec"]["devices"]
            for request in devices["requests"]:
                assert request["exactly"]["deviceClassName"] in classes, path.name
                seen += 1
            for config in devices.get("config", []):
                assert config["opaque"]["driver"] == "fake.dra-core.dev"
                decode(config["opaque"]["parameters"])
    assert seen >= 3


def test_overlay_sets_the_backend_options_by_their_environment_variables():
    ops = yaml.safe_load((OVERLAY / "daemonset-fake.yaml").read_text())
    env = {op["value"]["name"] for op in ops if op["path"].endswith("/env/-")}
    options = {o.env for o in dra_backend_fake.plugin.OPTIONS}
    assert env <= options
    assert {"DRA_FAKE_INVENTORY", "DRA_FAKE_CONTROL"} <= env
    args = next(op["value"] for op in ops if op["path"].endswith("/args"))
    assert args == ["run", "--backend", "fake"]
