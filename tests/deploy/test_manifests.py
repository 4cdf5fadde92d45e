"""Unit checks of deploy/: every YAML parses, kustomizations are complete, and the objects
say what the design asks (least-privilege RBAC, own-node VAP, rolling-update DaemonSet)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy import kustomize

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
I915 = DEPLOY / "overlays" / "i915"
HELM = DEPLOY / "helm"  # the chart (Go templates) and its values: tests/deploy/test_chart.py
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
YAML_FILES = sorted(
    p for p in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")] if not p.is_relative_to(HELM)
)
KUBELET_DIRS = {"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins", "/var/run/cdi"}


def _rel(p: Path) -> str:
    return str(p.relative_to(DEPLOY))


def _one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(objects):
    ds = _one(objects, "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return ds, container


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def base():
    return kustomize.build(BASE)


@pytest.fixture(scope="module")
def i915():
    return kustomize.build(I915)


# ------------------------------------------------------------------ files and kustomizations
def test_deploy_has_base_and_i915_overlay():
    assert {_rel(k) for k in KUSTOMIZATIONS} >= {"base", "overlays/i915"}


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert any(d is not None for d in docs), f"{_rel(path)} is empty"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_kustomization_references_exist(directory):
    k = kustomize.read_kustomization(directory)
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    assert k.get("resources"), "no resources"
    for entry in k["resources"]:
        path = directory / entry
        assert path.exists(), f"{_rel(directory)}: resource {entry} does not exist"
        if path.is_dir():
            kustomize.kustomization_file(path)
    for patch in k.get("patches", []):
        assert (directory / patch["path"]).is_file(), f"patch {patch['path']} does not exist"


def test_every_yaml_is_used_by_a_kustomization():
    used = set()
    for directory in KUSTOMIZATIONS:
        k = kustomize.read_kustomization(directory)
        used.add(kustomize.kustomization_file(directory).resolve())
        used |= {(directory / e).resolve() for e in k.get("resources", [])}
        used |= {(directory / p["path"]).resolve() for p in k.get("patches", [])}
    unused = [_rel(p) for p in YAML_FILES if p.resolve() not in used]
    assert not unused, f"YAML files no kustomization uses: {unused}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_objects_are_well_formed_and_unique(directory):
    objects = kustomize.build(directory)
    keys = []
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), obj
        assert obj["metadata"].get("name"), obj
        namespaced = obj["kind"] not in kustomize.CLUSTER_SCOPED_KINDS
        assert bool(obj["metadata"].get("namespace")) == namespaced, obj["metadata"]
        keys.append((obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]))
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"


def test_base_files_name_their_namespace_themselves():
    """kubectl apply -f on a single file must give the same namespace as apply -k."""
    k = kustomize.read_kustomization(BASE)
    for entry in k["resources"]:
        for obj in kustomize.load_documents(BASE / entry):
            if obj["kind"] not in kustomize.CLUSTER_SCOPED_KINDS:
                assert obj["metadata"].get("namespace") == k["namespace"], (entry, obj["kind"])


# ------------------------------------------------------------------ RBAC and VAP
def test_rbac_is_least_privilege(base):
    role = _one(base, "ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    slices = {
        ("resource.k8s.io", "resourceslices", v)
        for v in ("get", "list", "watch", "create", "update", "patch", "delete")
    }
    expected = slices | {
        ("resource.k8s.io", "resourceclaims", "get"),
        ("", "nodes", "get"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    }
    assert granted == expected
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def test_bindings_and_vap_name_the_agent_service_account(base):
    sa = _one(base, "ServiceAccount")
    ns, name = sa["metadata"]["namespace"], sa["metadata"]["name"]
    binding = _one(base, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": _one(base, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    ds, _ = _container(base)
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == name

    vap = _one(base, "ValidatingAdmissionPolicy")
    (condition,) = vap["spec"]["matchConditions"]
    assert f'"system:serviceaccount:{ns}:{name}"' in condition["expression"]
    vapb = _one(base, "ValidatingAdmissionPolicyBinding")
    assert vapb["spec"]["policyName"] == vap["metadata"]["name"]
    assert vapb["spec"]["validationActions"] == ["Deny"]


def test_vap_covers_every_write_of_resourceslices(base):
    vap = _one(base, "ValidatingAdmissionPolicy")
    assert vap["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert vap["spec"]["failurePolicy"] == "Fail"
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["resource.k8s.io"]
    assert rule["apiVersions"] == ["*"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    assert rule["resources"] == ["resourceslices"]
    text = yaml.safe_dump(vap["spec"])
    assert "authentication.kubernetes.io/node-name" in text
    assert "oldObject.spec" in text, "DELETE and UPDATE must check the existing slice"


# ------------------------------------------------------------------ DaemonSet
def test_daemonset_rolls_with_surge(base):
    ds, _ = _container(base)
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_daemonset_pod_settings(base):
    ds, container = _container(base)
    spec = ds["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["terminationGracePeriodSeconds"] >= 45  # an in-flight prepare may take 45 s
    assert container["command"] == ["dra-core"]
    assert container["args"] == ["run", "--backend", "fake"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], ports[probe["port"]]) == ("/healthz", 8080)
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], ports[probe["port"]]) == ("/readyz", 8080)
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


def test_daemonset_env(base):
    _, container = _container(base)
    env = _env(container)
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["DRA_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["DRA_REGISTRATION_DIR"]["value"] == "/var/lib/kubelet/plugins_registry"
    assert env["DRA_PLUGINS_DIR"]["value"] == "/var/lib/kubelet/plugins"
    assert env["DRA_CDI_DIR"]["value"] == "/var/run/cdi"
    assert env["DRA_HTTP_PORT"]["value"] == "8080"
    # The status endpoint listens on the pod IP, which is what the kubelet probes.
    assert env["DRA_HTTP_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["DRA_LOG_FORMAT"]["value"] == "json"


def test_env_names_are_read_by_the_cli():
    cli = (ROOT / "dra_core" / "cli.py").read_text()
    for name in ("NODE_NAME", "DRA_INSTANCE_ID", "DRA_REGISTRATION_DIR", "DRA_PLUGINS_DIR"):
        assert f'"{name}"' in cli, name
    for name in ("DRA_CDI_DIR", "DRA_HTTP_PORT", "DRA_HTTP_HOST", "DRA_LOG_FORMAT"):
        assert f'"{name}"' in cli, name


def _host_mounts(ds, container):
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in container["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }


def test_kubelet_and_cdi_dirs_are_mounted_at_their_host_paths(base):
    ds, container = _container(base)
    mounts = _host_mounts(ds, container)
    assert {p: p for p in KUBELET_DIRS} == mounts


def test_fake_base_is_not_privileged(base):
    ds, container = _container(base)
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert ds["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 0
    assert "hostNetwork" not in ds["spec"]["template"]["spec"]


# ------------------------------------------------------------------ i915 overlay
def test_i915_overlay_runs_the_i915_backend_privileged(i915):
    ds, container = _container(i915)
    # The backend's options --sysfs-root and --devfs-root: the host's, mounted at the same paths.
    assert container["args"] == [
        "run",
        "--backend",
        "i915",
        "--devfs-root=/dev",
        "--sysfs-root=/sys",
    ]
    assert container["securityContext"]["privileged"] is True
    env = _env(container)
    mounts = _host_mounts(ds, container)
    assert mounts == {**{p: p for p in KUBELET_DIRS}, "/sys": "/sys", "/dev": "/dev"}
    # Everything else of the base is kept.
    assert env["DRA_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}


def test_i915_overlay_selects_intel_gpu_nodes(i915):
    ds, _ = _container(i915)
    terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert "feature.node.kubernetes.io/pci-0300_8086.present" in keys
    assert "intel.feature.node.kubernetes.io/gpu" in keys  # Intel's NFD rule


def test_i915_overlay_has_device_classes_with_render_note(i915):
    classes = [o for o in i915 if o["kind"] == "DeviceClass"]
    assert classes
    for c in classes:
        assert c["apiVersion"] == "resource.k8s.io/v1"
    names = {c["metadata"]["name"] for c in classes}
    assert names == {
        "gpu.intel.com",
        "vf.gpu.intel.com",
        "shared.gpu.intel.com",
        "monitoring.gpu.intel.com",
    }
    # That the file is what `dra-core render` prints is checked in test_rendered_classes.py.


# ------------------------------------------------------------------ image and docs
def test_readme_documents_install_and_image_build():
    text = (DEPLOY / "README.md").read_text()
    assert "kubectl apply -k deploy/base" in text
    assert "kubectl apply -k deploy/overlays/i915" in text
    assert "helm install dra-core deploy/helm/dra-core" in text
    assert "docker build -f deploy/Dockerfile" in text


# ------------------------------------------------------------------ the loader itself
def test_json_patch_subset():
    doc = {"a": [1, 2], "b": {"c": 1}}
    out = kustomize.json_patch(
        doc,
        [
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "replace", "path": "/b/c", "value": 2},
            {"op": "add", "path": "/b/d~1e", "value": 4},
            {"op": "remove", "path": "/a/0"},
        ],
    )
    assert out == {"a": [2, 3], "b": {"c": 2, "d/e": 4}}
    assert doc == {"a": [1, 2], "b": {"c": 1}}
    with pytest.raises(KeyError):
        kustomize.json_patch(doc, [{"op": "replace", "path": "/x", "value": 1}])
