"""The Helm chart (deploy/helm/dra-core), checked with the Helm CLI built from its Go module.

Unit tests: `helm lint --strict` for every set of values used here, and what `helm template`
renders for each: the backend's driver in the own-node policy and the webhook, the backend's
DeviceClasses as `dra-core render` prints them, the agent's arguments accepted by `dra-core
run`'s own parser, privilege and mounts per backend, node selection, probes, the generated
webhook certificate, and the kustomize manifests of deploy/ equal to the chart, object by
object. `-m controlplane`: every rendered object passes a server-side dry run, and a real
`helm install`, `helm upgrade` and `helm uninstall` against the test API server.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import difflib
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from kubernetes.client.exceptions import ApiException

from dra_core import __version__, plugins
from dra_core.cli import _backend_config, _build_parser
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers as h
from tests.deploy import helmcli, kustomize
from tests.deploy.test_deploy_controlplane import (
    apply,
    bearer_client,
    check_pod_template,
    denied,
    object_path,
    request_token,
    slice_body,
)
from tests.deploy.test_policy_driver import agent_driver, policy_driver

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = helmcli.CHART
FAKE_VALUES = DEPLOY / "helm" / "fake-values.yaml"
INVENTORY = ROOT / "examples" / "fake" / "inventory.yaml"
KUBELET_DIRS = {"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins", "/var/run/cdi"}
#: The agent's environment the chart always sets (the rest are the backend's options).
CORE_ENV = {
    "NODE_NAME",
    "DRA_INSTANCE_ID",
    "DRA_REGISTRATION_DIR",
    "DRA_PLUGINS_DIR",
    "DRA_CDI_DIR",
    "DRA_HTTP_HOST",
    "DRA_HTTP_PORT",
    "DRA_LOG_FORMAT",
}
#: Labels only Helm's tooling reads: on the chart's objects, not on the kustomize ones.
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version")


@dataclass(frozen=True)
class Case:
    """One set of values: a dict, values files and --set-file entries."""

    values: Mapping[str, Any] = field(default_factory=dict)
    values_files: tuple[Path, ...] = ()
    set_files: Mapping[str, Path] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "values_files": self.values_files,
            "set_files": self.set_files,
        }


FAKE_KIND = Case(
    values_files=(FAKE_VALUES,), set_files={r"backendFiles.inventory\.yaml": INVENTORY}
)
CASES = {
    "fake": Case(),
    "fake-kind": FAKE_KIND,
    "i915": Case({"backend": "i915"}),
    "i915-options": Case(
        {
            "backend": "i915",
            "backendOptions": {"vf-profile": "flex170=flex170_m4", "shared-gpus": "all"},
            "backendConfig": {"vfTimeoutSeconds": 20, "sharedGpus": "none"},
        }
    ),
    "fake-webhook": Case({"webhook": {"enabled": True}}),
    "i915-webhook": Case({"backend": "i915", "webhook": {"enabled": True}}),
    "i915-driver-webhook-certmanager": Case(
        {
            "backend": "i915",
            "driverName": "gpu.example.com",
            "webhook": {
                "enabled": True,
                "tls": {
                    "mode": "certManager",
                    "certManager": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}},
                },
            },
        }
    ),
    "fake-webhook-own-secret": Case(
        {
            "driverName": "fake.example.com",
            "webhook": {
                "enabled": True,
                "replicas": 1,
                "tls": {
                    "mode": "secret",
                    "secretName": "my-tls",
                    "caBundle": base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode(),
                },
            },
        }
    ),
}
WEBHOOK_CASES = [name for name, case in CASES.items() if case.values.get("webhook")]


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _agent(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    ds = _one(objects, "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return ds, container


def _host_mounts(ds: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in container["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def _backend(objects: list[dict[str, Any]]) -> str:
    args = _agent(objects)[1]["args"]
    return str(args[args.index("--backend") + 1])


@pytest.fixture(scope="module")
def rendered(helm: helmcli.Helm) -> dict[str, list[dict[str, Any]]]:
    """Every case of CASES rendered once (release and namespace dra-core)."""
    return {name: helm.template(**case.kwargs()) for name, case in CASES.items()}


# ------------------------------------------------------------------ the tool and lint
def test_helm_is_built_from_the_pinned_module_version(helm):
    version = helm.run("version", "--template", "{{.Version}}").stdout.strip()
    assert version == helmcli.pinned_version() == "v4.3.1"
    assert not helm.binary.resolve().is_relative_to(ROOT), "cached outside the repository"


def test_the_chart_installs_this_version_of_dra_core():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__  # the default image tag
    assert chart["apiVersion"] == "v2"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lint_strict_passes(helm, case):
    result = helm.lint(**CASES[case].kwargs())
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "nvidia"}, "at '/backend': value must be one of 'fake', 'i915'"),
        ({"webhok": {"enabled": True}}, "additional properties 'webhok' not allowed"),
        ({"driverName": "Not A Driver"}, "/driverName"),
        ({"backendOptions": {"--devices": 8}}, "invalid propertyName '--devices'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ],
    ids=["backend", "typo", "driver-name", "option-name", "pull-policy"],
)
def test_lint_refuses_bad_values(helm, values, message):
    with pytest.raises(helmcli.HelmError) as info:
        helm.lint(values)
    assert message in str(info.value)


def test_template_refuses_incomplete_webhook_tls(helm):
    with pytest.raises(helmcli.HelmError) as info:
        helm.template({"webhook": {"enabled": True, "tls": {"mode": "secret"}}})
    assert "webhook.tls.caBundle (base64 of the PEM CA certificate) is required" in str(info.value)
    with pytest.raises(helmcli.HelmError) as info:
        helm.template({"backendConfig": {"a": 1}, "backendFiles": {"config.yaml": "x"}})
    assert "backendFiles may not hold config.yaml" in str(info.value)


# ------------------------------------------------------------------ what is rendered
@pytest.mark.parametrize("case", CASES, ids=str)
def test_objects_are_well_formed_and_unique(rendered, case):
    objects = rendered[case]
    keys = []
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), obj
        meta = obj["metadata"]
        namespaced = obj["kind"] not in kustomize.CLUSTER_SCOPED_KINDS
        assert (meta.get("namespace") == "dra-core") if namespaced else "namespace" not in meta
        if obj["kind"] != "DeviceClass":  # the rendered file, as `dra-core render` prints it
            assert meta["labels"]["app.kubernetes.io/instance"] == "dra-core", meta
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm", meta
        keys.append(_key(obj))
    assert len(keys) == len(set(keys)), keys
    kinds = {k[0] for k in keys}
    assert kinds >= {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "DaemonSet",
        "DeviceClass",
    }
    assert "Namespace" not in kinds  # the release's namespace is not the chart's
    assert ("Deployment" in kinds) == (case in WEBHOOK_CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_policy_binds_the_agents_driver_and_service_account(rendered, case):
    objects = rendered[case]
    assert policy_driver(objects) == agent_driver(objects)
    sa = _one(objects, "ServiceAccount", "dra-core-agent")["metadata"]
    policy = _one(objects, "ValidatingAdmissionPolicy")
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == (
        f'request.userInfo.username == "system:serviceaccount:{sa["namespace"]}:{sa["name"]}"'
    )
    binding = _one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    role = _one(objects, "ClusterRoleBinding")
    assert role["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]
    ds, _ = _agent(objects)
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]


def test_another_release_and_namespace_rename_everything(helm):
    objects = helm.template({"backend": "i915"}, release="gpu", namespace="gpu-system")
    names = {_key(o) for o in objects if o["kind"] != "DeviceClass"}
    assert all(name.startswith("gpu-dra-core-") for _, _, name in names), names
    policy = _one(objects, "ValidatingAdmissionPolicy")
    (condition,) = policy["spec"]["matchConditions"]
    assert "system:serviceaccount:gpu-system:gpu-dra-core-agent" in condition["expression"]
    assert policy_driver(objects) == "gpu.intel.com"
    ds, _ = _agent(objects)
    assert ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "gpu"


@pytest.mark.parametrize("backend", ["fake", "i915"])
def test_the_default_driver_is_the_backends(helm, backend):
    objects = helm.template({"backend": backend})
    identity = plugins.load(backend).backend_identity()
    assert policy_driver(objects) == identity.driver_name
    assert "--driver-name" not in _agent(objects)[1]["args"]


def test_the_chart_knows_every_installed_backend():
    schema = json.loads((CHART / "values.schema.json").read_text())
    chart_backends = set(schema["properties"]["backend"]["enum"])
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for backend in chart_backends:
        assert f"\n{backend}:\n" in helpers, f"_helpers.tpl has no entry for {backend}"
    assert chart_backends == {b.name for b in plugins.installed_backends()}


def _render(backend: str, driver: str | None, *args: str) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "dra_core", "render", "--backend", backend, *args]
    if driver:
        command += ["--driver-name", driver]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("driver", [None, "devices.example.com"], ids=["own", "other"])
@pytest.mark.parametrize("backend", ["fake", "i915"])
def test_device_classes_are_the_backends_rendered_classes(helm, backend, driver):
    """The classes come from files/deviceclasses-BACKEND.yaml (test_rendered_classes.py keeps
    it what `dra-core render` prints); with another driver name they are what `dra-core render
    --driver-name` prints."""
    values: dict[str, Any] = {"backend": backend}
    if driver:
        values["driverName"] = driver
    classes = [o for o in helm.template(values) if o["kind"] == "DeviceClass"]
    assert classes == _render(backend, driver)
    none = helm.template({"backend": backend, "deviceClasses": {"create": False}})
    assert not [o for o in none if o["kind"] == "DeviceClass"]


#: A release of each supported minor, and a provider's build of one.
CLUSTER_RELEASES = ["v1.34.4", "v1.35.4", "v1.36.3", "v1.37.2", "v1.35.2-gke.1100"]
#: The cluster's gates as `deviceClasses.featureGates` and as `dra-core render --feature-gates`.
GATE_CHOICES = {
    "defaults": ({}, ""),
    "capacity-on": ({"DRAConsumableCapacity": True}, "DRAConsumableCapacity=true"),
    "capacity-off": ({"DRAConsumableCapacity": False}, "DRAConsumableCapacity=false"),
}


@pytest.mark.parametrize(
    ("release", "gates"),
    [(r, "defaults") for r in CLUSTER_RELEASES]
    + [("v1.35.4", "capacity-on"), ("v1.37.2", "capacity-off")],
    ids=str,
)
@pytest.mark.parametrize("backend", ["fake", "i915"])
def test_device_classes_follow_the_clusters_release_and_gates(helm, backend, release, gates):
    """On each release, and with the gates set in the values, the chart installs the classes
    `dra-core render --kubernetes-version` prints: only those the API server accepts."""
    feature_gates, flag = GATE_CHOICES[gates]
    values = {"backend": backend, "deviceClasses": {"featureGates": feature_gates}}
    classes = [o for o in helm.template(values, kube_version=release) if o["kind"] == "DeviceClass"]
    args = ["--kubernetes-version", release, *(["--feature-gates", flag] if flag else [])]
    assert classes == _render(backend, None, *args)
    shared = any(o["metadata"]["name"].startswith("shared.") for o in classes)
    on_by_default = release.startswith(("v1.36", "v1.37"))
    assert shared == (feature_gates.get("DRAConsumableCapacity", on_by_default))


def test_the_install_notes_name_the_classes_left_out(helm):
    def notes(values: dict[str, Any]) -> str:
        args = ["install", "x", str(CHART), "--dry-run=client", *helm.values_args(values)]
        return helm.run(*args).stdout.partition("NOTES:")[2]

    assert "Not installed" not in notes({"backend": "i915"})
    off = notes(
        {"backend": "i915", "deviceClasses": {"featureGates": {"DRAConsumableCapacity": False}}}
    )
    assert (
        "Not installed: DeviceClass shared.gpu.intel.com, whose selector needs the feature gate "
        "DRAConsumableCapacity,"
    ) in off
    assert "set deviceClasses.featureGates.DRAConsumableCapacity=true" in off


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_agents_arguments_are_options_of_dra_core_run(rendered, case):
    """The real parser of `dra-core run` with the backend's options accepts the arguments the
    chart renders, and reads the options the values give."""
    objects = rendered[case]
    _, container = _agent(objects)
    assert container["command"] == ["dra-core"]
    backend = _backend(objects)
    hooks = plugins.load(backend)
    args = _build_parser(hooks.backend_options()).parse_args(container["args"])
    assert args.command == "run"
    assert args.backend == backend
    options = {**CASES[case].values.get("backendOptions", {})}
    if backend == "i915":
        options = {"sysfs-root": "/sys", "devfs-root": "/dev", **options}
    for name, value in options.items():
        assert str(getattr(args, name.replace("-", "_"))) == str(value), name
    # Options given by environment instead (fake-values.yaml) are named as the backend reads them.
    env = {e["name"] for e in container["env"]} - CORE_ENV
    assert env <= {o.env for o in hooks.backend_options()}
    assert bool(env) == (case == "fake-kind")


def test_boolean_and_numeric_options(helm):
    objects = helm.template(
        {"backendOptions": {"devices": 8, "control-interval": 0.5, "on": True, "off": False}}
    )
    args = _agent(objects)[1]["args"]
    assert args[3:] == ["--control-interval=0.5", "--devices=8", "--on"]


def test_backend_files_and_config(helm, rendered, tmp_path):
    objects = rendered["i915-options"]
    files = _one(objects, "ConfigMap", "dra-core-agent-files")
    _, container = _agent(objects)
    args = container["args"]
    path = args[args.index("--config") + 1]
    assert path == "/etc/dra-core/files/config.yaml"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "agent-files"]
    assert mount == {"name": "agent-files", "mountPath": "/etc/dra-core/files", "readOnly": True}
    # The agent reads the file's backend section as the values gave it.
    local = tmp_path / "config.yaml"
    local.write_text(files["data"]["config.yaml"])
    assert _backend_config(local) == CASES["i915-options"].values["backendConfig"]

    # The fake inventory arrives byte for byte; a changed file changes the pod template.
    kind = rendered["fake-kind"]
    assert _one(kind, "ConfigMap")["data"] == {"inventory.yaml": INVENTORY.read_text()}
    checksum = _agent(kind)[0]["spec"]["template"]["metadata"]["annotations"]
    changed_inventory = tmp_path / "inventory.yaml"
    changed_inventory.write_text(INVENTORY.read_text() + "# changed\n")
    changed = helm.template(
        values_files=[FAKE_VALUES],
        set_files={r"backendFiles.inventory\.yaml": changed_inventory},
    )
    assert _agent(changed)[0]["spec"]["template"]["metadata"]["annotations"] != checksum
    # Without files there is neither ConfigMap nor mount nor annotation.
    plain = rendered["fake"]
    assert not [o for o in plain if o["kind"] == "ConfigMap"]
    assert "annotations" not in _agent(plain)[0]["spec"]["template"]["metadata"]


# ------------------------------------------------------------------ the DaemonSet
@pytest.mark.parametrize("case", ["fake", "i915"])
def test_daemonset_rolls_with_surge_and_probes_its_status_port(rendered, case):
    ds, container = _agent(rendered[case])
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] >= 45
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["DRA_HTTP_PORT"]["value"] == str(ports["http"]) == "8080"
    assert env["DRA_HTTP_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["DRA_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_the_status_port_and_directories_follow_the_values(helm):
    ds, container = _agent(
        helm.template({"httpPort": 9090, "kubeletDir": "/data/kubelet", "cdiDir": "/etc/cdi"})
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DRA_HTTP_PORT"] == "9090"
    assert container["ports"][0]["containerPort"] == 9090
    assert env["DRA_REGISTRATION_DIR"] == "/data/kubelet/plugins_registry"
    assert env["DRA_PLUGINS_DIR"] == "/data/kubelet/plugins"
    assert env["DRA_CDI_DIR"] == "/etc/cdi"
    assert _host_mounts(ds, container) == {
        p: p for p in ("/data/kubelet/plugins_registry", "/data/kubelet/plugins", "/etc/cdi")
    }


def test_fake_has_no_privilege_beyond_its_mounts(rendered):
    ds, container = _agent(rendered["fake"])
    sc = container["securityContext"]
    assert sc == {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    pod = ds["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert _host_mounts(ds, container) == {p: p for p in KUBELET_DIRS}
    ds, container = _agent(rendered["fake-kind"])
    assert _host_mounts(ds, container) == {
        **{p: p for p in KUBELET_DIRS},
        "/var/lib/dra-core-fake": "/var/lib/dra-core-fake",
    }


def test_i915_is_privileged_with_host_sysfs_and_devfs(rendered):
    ds, container = _agent(rendered["i915"])
    assert container["securityContext"] == {"privileged": True, "readOnlyRootFilesystem": True}
    assert _host_mounts(ds, container) == {
        **{p: p for p in KUBELET_DIRS},
        "/sys": "/sys",
        "/dev": "/dev",
    }


def test_privilege_and_capabilities_can_be_set(helm):
    _, container = _agent(helm.template({"backend": "i915", "privileged": False}))
    assert container["securityContext"]["privileged"] is False
    _, container = _agent(helm.template({"addCapabilities": ["MKNOD"]}))
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["MKNOD"]}


def _node_terms(objects: list[dict[str, Any]]) -> list[list[dict[str, Any]]] | None:
    affinity = _agent(objects)[0]["spec"]["template"]["spec"].get("affinity")
    if affinity is None:
        return None
    required = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [t["matchExpressions"] for t in required["nodeSelectorTerms"]]


def test_node_selection(helm, rendered):
    # i915: any one of the Intel GPU labels; fake: every Linux node.
    terms = _node_terms(rendered["i915"])
    assert terms is not None
    assert [[(e["key"], e["operator"], e["values"]) for e in t] for t in terms] == [
        [(key, "In", ["true"])]
        for key in (
            "feature.node.kubernetes.io/pci-0300_8086.present",
            "feature.node.kubernetes.io/pci-0380_8086.present",
            "intel.feature.node.kubernetes.io/gpu",
            "gpu.intel.com/dra-core",
        )
    ]
    assert _node_terms(rendered["fake"]) is None
    # A label of one's own, none at all, a whole affinity, a node selector.
    assert _node_terms(helm.template({"backend": "i915", "nodeLabels": ["gpus"]})) == [
        [{"key": "gpus", "operator": "In", "values": ["true"]}]
    ]
    assert _node_terms(helm.template({"backend": "i915", "nodeLabels": []})) is None
    own = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    objects = helm.template({"backend": "i915", "affinity": own, "nodeSelector": {"pool": "a"}})
    spec = _agent(objects)[0]["spec"]["template"]["spec"]
    assert spec["affinity"] == own
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "a"}


# ------------------------------------------------------------------ the webhook
@pytest.mark.parametrize("case", WEBHOOK_CASES, ids=str)
def test_the_webhook_is_wired_for_the_chosen_backend(rendered, case):
    objects = rendered[case]
    driver = agent_driver(objects)
    backend = _backend(objects)
    deployment = _one(objects, "Deployment", "dra-core-webhook")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:3] == ["webhook", "--backend", backend]
    if CASES[case].values.get("driverName"):
        assert args[args.index("--driver-name") + 1] == driver
    else:
        assert "--driver-name" not in args
    parsed = _build_parser().parse_args(args)
    assert (parsed.backend, str(parsed.tls_cert_file)) == (
        backend,
        "/etc/dra-core/webhook-tls/tls.crt",
    )

    service = _one(objects, "Service", "dra-core-webhook")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]
    vwc = _one(objects, "ValidatingWebhookConfiguration", "dra-core-webhook")
    hooks = vwc["webhooks"]
    assert [w["name"] for w in hooks] == [
        f"{r}.{driver}" for r in ("resourceclaims", "resourceclaimtemplates", "deviceclasses")
    ]
    for hook in hooks:
        assert hook["clientConfig"]["service"] == {
            "name": "dra-core-webhook",
            "namespace": "dra-core",
            "path": "/validate",
            "port": 443,
        }
        (condition,) = hook["matchConditions"]
        assert condition["expression"].endswith(f"c.opaque.driver == '{driver}')")
        assert hook["failurePolicy"] == "Fail"
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    secret = (
        CASES[case].values["webhook"].get("tls", {}).get("secretName") or "dra-core-webhook-tls"
    )
    assert volume["secret"]["secretName"] == secret
    pdb = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert len(pdb) == (deployment["spec"]["replicas"] > 1)


def test_the_generated_webhook_certificate(rendered):
    objects = rendered["fake-webhook"]
    secret = _one(objects, "Secret", "dra-core-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    # Signed by the CA, for the Service's names, valid now.
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) >= {"dra-core-webhook.dra-core.svc"}
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    # The key is the certificate's, and every webhook trusts that CA.
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(data["tls.key"], password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    vwc = _one(objects, "ValidatingWebhookConfiguration")
    assert {w["clientConfig"]["caBundle"] for w in vwc["webhooks"]} == {secret["data"]["ca.crt"]}
    assert "annotations" not in vwc["metadata"]


def test_the_webhook_tls_with_cert_manager_or_an_own_secret(rendered, helm):
    objects = rendered["i915-driver-webhook-certmanager"]
    certificate = _one(objects, "Certificate", "dra-core-webhook")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"] == {
        "secretName": "dra-core-webhook-tls",
        "dnsNames": [
            "dra-core-webhook.dra-core.svc",
            "dra-core-webhook.dra-core.svc.cluster.local",
        ],
        "issuerRef": {"name": "ca", "kind": "ClusterIssuer"},
    }
    vwc = _one(objects, "ValidatingWebhookConfiguration")
    assert vwc["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "dra-core/dra-core-webhook"
    }
    assert not any("caBundle" in w["clientConfig"] for w in vwc["webhooks"])
    assert not [o for o in objects if o["kind"] == "Secret"]
    # Without an issuer the Certificate is the user's: the chart only asks for injection.
    plain = helm.template({"webhook": {"enabled": True, "tls": {"mode": "certManager"}}})
    assert not [o for o in plain if o["kind"] in ("Certificate", "Secret")]

    own = rendered["fake-webhook-own-secret"]
    assert not [o for o in own if o["kind"] in ("Certificate", "Secret")]
    ca = CASES["fake-webhook-own-secret"].values["webhook"]["tls"]["caBundle"]
    vwc = _one(own, "ValidatingWebhookConfiguration")
    assert {w["clientConfig"]["caBundle"] for w in vwc["webhooks"]} == {ca}


# ------------------------------------------------------------------ kustomize == chart
def _comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` without what only Helm's tooling reads: HELM_ONLY_LABELS and the pod template's
    checksum annotations (which roll the pods when their files change on `helm upgrade`)."""
    obj = copy.deepcopy(obj)
    labels = obj["metadata"].get("labels", {})
    for label in HELM_ONLY_LABELS:
        labels.pop(label, None)
    template = obj.get("spec", {}).get("template", {}).get("metadata", {})
    annotations = template.get("annotations", {})
    for name in [a for a in annotations if a.startswith("checksum/")]:
        del annotations[name]
    if "annotations" in template and not annotations:
        del template["annotations"]
    return obj


#: Each kustomize directory (or pair applied together) and the values that make the chart
#: render the same objects. The Namespace of deploy/base is the one object the chart leaves to
#: the user (`kubectl create namespace` or `helm install --create-namespace`).
KUSTOMIZE_CASES = {
    "base": (["base"], Case({"deviceClasses": {"create": False}})),
    "overlays/fake": (["overlays/fake"], FAKE_KIND),
    "overlays/i915": (["overlays/i915"], Case({"backend": "i915"})),
    "base+webhook": (
        ["base", "webhook"],
        Case(
            {
                "deviceClasses": {"create": False},
                "webhook": {"enabled": True, "tls": {"mode": "certManager"}},
            }
        ),
    ),
}


@pytest.mark.parametrize("name", KUSTOMIZE_CASES, ids=str)
def test_the_kustomize_manifests_are_the_charts(helm, name):
    directories, case = KUSTOMIZE_CASES[name]
    from_kustomize = {
        _key(o): o
        for d in directories
        for o in kustomize.build(DEPLOY / d)
        if o["kind"] != "Namespace"
    }
    from_chart = {_key(o): _comparable(o) for o in helm.template(**case.kwargs())}
    assert sorted(from_kustomize) == sorted(from_chart), (
        f"only in deploy/{name}: {sorted(set(from_kustomize) - set(from_chart))}; "
        f"only in the chart: {sorted(set(from_chart) - set(from_kustomize))}"
    )
    for key, obj in from_kustomize.items():
        if obj != from_chart[key]:
            diff = difflib.unified_diff(
                yaml.safe_dump(obj).splitlines(),
                yaml.safe_dump(from_chart[key]).splitlines(),
                f"deploy/{name}",
                "the chart",
                lineterm="",
            )
            pytest.fail(f"{key} differs:\n" + "\n".join(diff), pytrace=False)


def test_the_comparison_notices_a_difference(helm):
    """The equality above is not vacuous: a changed value makes an object differ."""
    _, case = KUSTOMIZE_CASES["overlays/i915"]
    chart = {_key(o): _comparable(o) for o in helm.template({**case.values, "httpPort": 8081})}
    kust = {_key(o): o for o in kustomize.build(DEPLOY / "overlays/i915")}
    key = ("DaemonSet", "dra-core", "dra-core-agent")
    assert kust[key] != chart[key]
    del kust[("Namespace", "", "dra-core")]
    same = [k for k in kust if kust[k] == chart[k]]
    assert key not in same and len(same) == len(kust) - 1


# ------------------------------------------------------------------ the real API server
def _dry_run_all(kube_api, objects: list[dict[str, Any]]) -> None:
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    for account in accounts:  # pods need them to exist
        apply(kube_api, account)
    try:
        for obj in objects:
            try:
                result = apply(kube_api, obj, dry_run=True)
            except ApiException as e:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} rejected: {e.body}")
            assert result["kind"] == obj["kind"]
            if obj["kind"] in ("DaemonSet", "Deployment"):
                check_pod_template(kube_api, result)
    finally:
        for account in accounts:
            h.delete(kube_api, object_path(account))


@pytest.mark.controlplane
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rendered_objects_pass_a_server_side_dry_run(
    helm, control_plane, kube_api, namespace, case
):
    """Each object is validated by the API server without being stored, and a pod made from
    each DaemonSet and Deployment passes pod admission; a cert-manager Certificate is left
    out (the test control plane has no cert-manager CRDs)."""
    # For the harness's release, as `helm install` renders for the cluster it installs into.
    objects = helm.template(
        **CASES[case].kwargs(), namespace=namespace, kube_version=control_plane.k8s_version
    )
    checked = [o for o in objects if o["apiVersion"] != "cert-manager.io/v1"]
    assert len(objects) - len(checked) == (case == "i915-driver-webhook-certmanager")
    _dry_run_all(kube_api, checked)
    with pytest.raises(ApiException) as gone:  # nothing was stored
        h.get(kube_api, object_path(_one(checked, "DaemonSet")))
    assert gone.value.status == 404


def _exists(kube_api, obj: dict[str, Any]) -> bool:
    try:
        h.get(kube_api, object_path(obj))
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def _ca_bundles(vwc: dict[str, Any]) -> set[str]:
    return {w["clientConfig"]["caBundle"] for w in vwc["webhooks"]}


def _device_class(name: str, driver: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"config": [{"opaque": {"driver": driver, "parameters": {"kind": "X"}}}]},
    }


@pytest.mark.controlplane
def test_helm_install_upgrade_and_uninstall(
    helm, control_plane, kube_api, dra_kube_client, namespace
):
    """A real release against the test API server: the chart installs into a namespace and
    release name of its own with a driver name of its own; the agent's token is held to its
    node by the chart's policy, the webhook is called for the driver's configs, an upgrade
    keeps the generated webhook certificate, and an uninstall removes every object of the
    release and leaves the published slices, which the documented command removes. No pod
    runs (no node matches the node selectors)."""
    release = h.unique_name("rel")
    driver = f"{h.unique_name('drv')}.dra-core.test"
    values = {
        "driverName": driver,
        "nodeSelector": {"dra-core.test/none": "true"},
        "webhook": {
            "enabled": True,
            "replicas": 1,
            "nodeSelector": {"dra-core.test/none": "true"},
        },
    }
    kubeconfig = control_plane.kubeconfig_path
    common = ["--namespace", namespace, *helm.values_args(values)]
    objects = helm.template(
        values, release=release, namespace=namespace, kube_version=control_plane.k8s_version
    )
    classes = [o for o in objects if o["kind"] == "DeviceClass"]
    assert classes and all(driver in o["metadata"]["name"] for o in classes)

    helm.run("install", release, str(CHART), *common, kubeconfig=kubeconfig)
    slices = []
    node = h.unique_name("node")
    create_ready_node(dra_kube_client, node, untaint=False)
    try:
        for obj in objects:
            assert _exists(kube_api, obj), f"{_key(obj)} was not installed"
        status = json.loads(
            helm.run("status", release, "-n", namespace, "-o", "json", kubeconfig=kubeconfig).stdout
        )
        assert status["info"]["status"] == "deployed"
        secret_path = f"/api/v1/namespaces/{namespace}/secrets/{release}-dra-core-webhook-tls"
        secret = h.get(kube_api, secret_path)
        vwc_path = (
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/"
            f"{release}-dra-core-webhook"
        )
        assert _ca_bundles(h.get(kube_api, vwc_path)) == {secret["data"]["ca.crt"]}

        # The policy holds the release's agent to its node and driver.
        agent_sa = {"namespace": namespace, "name": f"{release}-dra-core-agent"}
        body = h.pod_body(h.unique_name("agent"), node_name=node)
        body["spec"]["serviceAccountName"] = agent_sa["name"]
        pod = h.create_pod(kube_api, namespace, body)
        api = bearer_client(control_plane, request_token(kube_api, agent_sa, pod))
        slices_path = f"{h.RESOURCE_API}/resourceslices"
        try:
            other = slice_body(h.unique_name("other"), "some-other-node", driver=driver)

            def enforced() -> bool:
                try:
                    h.create(api, slices_path, other, query={"dryRun": "All"})
                except ApiException as e:
                    return e.status == 403 and f"{release}-dra-core-resourceslices" in e.body
                return False

            h.wait_for(enforced, timeout=30, description="the release's policy to be enforced")
            own = slice_body(h.unique_name("own"), node, driver=driver)
            slices.append(own["metadata"]["name"])
            h.create(api, slices_path, own)
            err = denied(
                h.create, api, slices_path, slice_body("x", node, driver="fake.dra-core.dev")
            )
            assert f"the dra-core agent for driver '{driver}' may only write" in err.body
        finally:
            api.close()

        # The webhook is called for configs of this driver (and, with no pod serving it,
        # refuses them: failurePolicy Fail), not for another driver's.
        classes_path = f"{h.RESOURCE_API}/deviceclasses"
        with pytest.raises(ApiException) as info:
            h.create(kube_api, classes_path, _device_class("c1", driver), query={"dryRun": "All"})
        assert f"deviceclasses.{driver}" in info.value.body
        h.create(
            kube_api,
            classes_path,
            _device_class("c2", "other.example.com"),
            query={"dryRun": "All"},
        )

        # An upgrade to another image tag: the agent's image changes, the certificate stays.
        helm.run(
            "upgrade", release, str(CHART), *common, "--set", "image.tag=0.1.1",
            kubeconfig=kubeconfig,
        )  # fmt: skip
        ds_path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{release}-dra-core-agent"
        (container,) = h.get(kube_api, ds_path)["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "dra-core:0.1.1"
        assert h.get(kube_api, secret_path)["data"] == secret["data"]
        assert _ca_bundles(h.get(kube_api, vwc_path)) == {secret["data"]["ca.crt"]}

        helm.run("uninstall", release, "-n", namespace, "--wait", kubeconfig=kubeconfig)
        h.wait_for(
            lambda: not [o for o in objects if _exists(kube_api, o)],
            timeout=30,
            description="every object of the release to be removed",
        )
        # The slice the agent published is still there, until removed as deploy/README.md says.
        listed = h.get(kube_api, slices_path, query={"fieldSelector": f"spec.driver={driver}"})
        assert [s["metadata"]["name"] for s in listed["items"]] == slices
        h.request(kube_api, "DELETE", slices_path, query={"fieldSelector": f"spec.driver={driver}"})
        listed = h.get(kube_api, slices_path, query={"fieldSelector": f"spec.driver={driver}"})
        assert listed["items"] == []
        slices.clear()
    finally:
        with contextlib.suppress(helmcli.HelmError):
            helm.run("uninstall", release, "-n", namespace, kubeconfig=kubeconfig)
        for name in slices:
            h.delete_resource_slice(kube_api, name)
        h.delete_node(kube_api, node)
