"""The DeviceClasses in deploy/ (the kustomize overlays and the Helm chart's files) are what
`dra-core render` prints for each backend; for a given release and feature gates it prints only
the classes that API server accepts (checked with the harness's real one, `-m controlplane`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from dra_core.manifests import (
    GATES_ANNOTATION,
    LeftOut,
    device_class_manifests,
    required_gates,
    select_classes,
)
from dra_core.model import DeviceClassSpec
from dra_core.releases import gate_defaults, gates_on
from tests.controlplane import helpers as h

DEPLOY = Path(__file__).parent.parent.parent / "deploy"
#: Where each backend's rendered classes are kept: {backend} is the backend's name.
TARGETS = [
    "overlays/{backend}/deviceclasses.yaml",
    "helm/dra-core/files/deviceclasses-{backend}.yaml",
]
BACKENDS = ["fake", "i915"]


def render(backend: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dra_core", "render", "--backend", backend, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rendered_device_classes_are_current(backend, target):
    path = target.format(backend=backend)
    committed = (DEPLOY / path).read_text()
    assert committed == render(backend), (
        f"deploy/{path} is stale: run `dra-core render --backend {backend} > deploy/{path}`"
    )


def test_every_backend_of_the_chart_has_its_classes():
    files = {p.name for p in (DEPLOY / "helm/dra-core/files").glob("deviceclasses-*.yaml")}
    assert files == {f"deviceclasses-{b}.yaml" for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_names_another_driver(backend):
    """--driver-name renders the classes for that driver (the chart relies on it)."""
    default = [d for d in yaml.safe_load_all(render(backend)) if d]
    other = [d for d in yaml.safe_load_all(render(backend, "--driver-name", "x.example.com")) if d]
    assert len(other) == len(default)
    for mine, theirs in zip(other, default, strict=True):
        text = yaml.safe_dump(mine)
        assert "x.example.com" in mine["metadata"]["name"]
        assert 'device.driver == "x.example.com"' in text
        assert yaml.safe_dump(theirs).count("x.example.com") == 0


def _classes(text: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(text) if d}


def test_a_class_names_the_gates_its_selectors_need():
    """The gates come from the CEL fields used, not from the class's name."""
    plain = DeviceClassSpec("a.example.com", ('device.driver == "a.example.com"',))
    shared = DeviceClassSpec(
        "pool.example.com",
        ('device.driver == "a"', "device.allowMultipleAllocations == true"),
    )
    quoted = DeviceClassSpec("b.example.com", ('device.attributes["a"].note == "device.x"',))
    assert [required_gates(c) for c in (plain, shared, quoted)] == [
        (),
        ("DRAConsumableCapacity",),
        (),
    ]
    kept, left_out = select_classes([plain, shared], {"DRAConsumableCapacity": False})
    assert kept == [plain]
    assert left_out == [LeftOut(shared, ("DRAConsumableCapacity",))]
    (body,) = device_class_manifests([shared])
    assert body["metadata"]["annotations"][GATES_ANNOTATION] == "DRAConsumableCapacity"
    assert device_class_manifests([plain, shared], {"DRAConsumableCapacity": True})[1] == body


@pytest.mark.parametrize(
    ("args", "shared"),
    [
        ((), True),
        (("--kubernetes-version", "v1.34.4"), False),
        (("--kubernetes-version", "1.35"), False),
        (("--kubernetes-version", "v1.36.0-eks.3"), True),
        (("--kubernetes-version", "v1.37.2"), True),
        (("--kubernetes-version", "v1.40.0"), True),
        (
            ("--kubernetes-version", "v1.34.4", "--feature-gates", "DRAConsumableCapacity=true"),
            True,
        ),
        (
            ("--kubernetes-version", "v1.37.2", "--feature-gates", "DRAConsumableCapacity=false"),
            False,
        ),
    ],
    ids=str,
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_render_for_a_release_prints_only_the_classes_it_accepts(backend, args, shared):
    every = _classes(render(backend))
    out = render(backend, *args)
    classes = _classes(out)
    left_out = {n for n in every if n.startswith("shared.")} - set(classes) if not shared else set()
    assert set(classes) == set(every) - left_out
    assert all(classes[n] == every[n] for n in classes)
    for name in left_out:  # each named in a comment, with the gate and what to do
        assert f"# Left out: {name} (feature gate DRAConsumableCapacity " in out
        assert "--feature-gates DRAConsumableCapacity=true" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--kubernetes-version", "1.33.2"), "dra-core needs 1.34 or later"),
        (("--kubernetes-version", "latest"), "is not a Kubernetes release like v1.34.4"),
        (("--feature-gates", "DRAConsumableCapacity=true"), "needs --kubernetes-version"),
        (("--kubernetes-version", "1.35", "--feature-gates", "X"), "write NAME=true or NAME=false"),
        (
            ("--kubernetes-version", "1.34", "--feature-gates", "DRADeviceTaintRules=true"),
            "feature gate DRADeviceTaintRules does not exist in Kubernetes 1.34",
        ),
    ],
    ids=str,
)
def test_render_refuses_a_release_or_gates_it_cannot_use(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "render", "--backend", "fake", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_release_table_ignores_gates_dra_core_does_not_use():
    assert gates_on("v1.35.4", {"SomeOtherGate": True, "DRAPartitionableDevices": True}) == {
        **gate_defaults("v1.35.4"),
        "DRAPartitionableDevices": True,
    }


@pytest.mark.controlplane
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_harness_api_server_accepts_every_rendered_class(control_plane, kube_api, backend):
    """The classes `dra-core render` prints for the harness's release and gates all pass a
    server-side dry run, and every class it leaves out is refused for the gate it names: the
    derivation is checked both ways by the real API server."""
    gates = {g: on for g, on in control_plane.enabled_gates().items() if on}
    flag = ",".join(f"{g}=true" for g in sorted(gates))
    version = control_plane.k8s_version
    args = ["--kubernetes-version", version, *(["--feature-gates", flag] if flag else [])]
    kept = _classes(render(backend, *args))
    every = _classes(render(backend))
    assert kept, "render printed no class"
    for name, body in every.items():
        try:
            h.create(kube_api, f"{h.RESOURCE_API}/deviceclasses", body, query={"dryRun": "All"})
        except ApiException as e:
            assert name not in kept, f"Kubernetes {version} refused {name}: {e.body}"
            needed = body["metadata"]["annotations"][GATES_ANNOTATION]
            assert "undefined field" in e.body, e.body
            assert not any(gates.get(g) for g in needed.split(",")), (needed, gates)
        else:
            assert name in kept, f"{name} was left out, but Kubernetes {version} accepts it"
