"""Pods on the real node, and what their containers saw.

Each test pod runs :data:`REPORT`: it prints its environment and every character device under
``/dev`` (major:minor), then sleeps, so a test reads what the container runtime really gave
the container from the container's log.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dra_core.testing.node import TEST_IMAGE, Node
from tests.controlplane import helpers

REPORT = (
    "echo '== env'; env; echo '== devices';"
    " find /dev -type c | while read -r f; do stat -L -c '%n %t:%T' \"$f\"; done;"
    " echo '== end'; exec sleep 3600"
)


def pod_body(
    name: str,
    node: str,
    claims: dict[str, dict[str, str]],
    containers: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """A pod on ``node`` whose ``claims`` (name -> ``resourceClaimName`` or
    ``resourceClaimTemplateName``) go to ``containers`` (name -> claim names; default: one
    container ``c`` with all claims)."""
    containers = containers or {"c": list(claims)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "restartPolicy": "Never",
            "hostNetwork": True,  # the test node's pod network is loopback only
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": container,
                    "image": TEST_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", REPORT],
                    "resources": {"claims": [{"name": c} for c in used]},
                }
                for container, used in containers.items()
            ],
            "resourceClaims": [{"name": n, **source} for n, source in claims.items()],
        },
    }


def from_template(template: str, claim: str = "dev") -> dict[str, dict[str, str]]:
    """The pod claims of :func:`pod_body` for one claim made from ``template``."""
    return {claim: {"resourceClaimTemplateName": template}}


def start(
    api,
    namespace: str,
    node: Node,
    name: str,
    claims: dict[str, dict[str, str]],
    containers: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Create the pod on ``node`` and wait until it runs."""
    helpers.create_pod(api, namespace, pod_body(name, node.name, claims, containers))
    return wait_running(api, namespace, name)


def claim_template(
    name: str, device_class: str, request_name: str = "dev", **request: Any
) -> dict[str, Any]:
    """A ResourceClaimTemplate with one request of ``device_class``; ``request`` adds fields
    of ``exactly`` (``selectors``, ``capacity``, ``count``...)."""
    exactly = {"deviceClassName": device_class, **request}
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name},
        "spec": {"spec": {"devices": {"requests": [{"name": request_name, "exactly": exactly}]}}},
    }


def create_template(api, namespace: str, body: dict[str, Any]) -> None:
    helpers.create(
        api, f"{helpers.RESOURCE_API}/namespaces/{namespace}/resourceclaimtemplates", body
    )


def create_claim(api, namespace: str, name: str, device_class: str, **request: Any) -> None:
    body = claim_template(name, device_class, **request)
    helpers.create(
        api,
        f"{helpers.RESOURCE_API}/namespaces/{namespace}/resourceclaims",
        {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
         "metadata": {"name": name}, "spec": body["spec"]["spec"]},
    )  # fmt: skip


def phase(api, namespace: str, name: str) -> tuple[str, str]:
    """The pod's phase and, when it waits, why (for messages)."""
    pod = helpers.get_pod(api, namespace, name)
    status = pod.get("status", {})
    waiting = [
        f"{c['name']}: {w.get('reason')} {w.get('message', '')}"
        for c in status.get("containerStatuses", [])
        if (w := c.get("state", {}).get("waiting"))
    ]
    conditions = [
        f"{c['type']}={c['status']} {c.get('message', '')}" for c in status.get("conditions", [])
    ]
    return status.get("phase", "?"), "; ".join(waiting or conditions)


def wait_running(api, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    seen = {"why": ""}

    def running() -> bool:
        current, seen["why"] = phase(api, namespace, name)
        assert current not in ("Failed", "Succeeded"), f"pod {name} {current}: {seen['why']}"
        return current == "Running"

    try:
        helpers.wait_for(running, timeout, f"pod {name} Running")
    except TimeoutError as e:
        events = helpers.get(
            api, f"/api/v1/namespaces/{namespace}/events",
            query={"fieldSelector": f"involvedObject.name={name}"},
        )["items"]  # fmt: skip
        said = "; ".join(f"{ev.get('reason')}: {ev.get('message')}" for ev in events[-5:])
        raise TimeoutError(f"{e}; pod: {seen['why']}; events: {said}") from None
    return helpers.get_pod(api, namespace, name)


@dataclass(frozen=True)
class ContainerView:
    env: dict[str, str]
    devices: dict[str, tuple[int, int]]  # path -> (major, minor)


def container_view(node: Node, namespace: str, pod: str, container: str = "c") -> ContainerView:
    """Wait for the container's report and parse it."""
    out = {"text": ""}

    def reported() -> bool:
        out["text"] = node.container_log(namespace, pod, container)
        return "== end" in out["text"]

    helpers.wait_for(reported, 30, f"the report of {pod}/{container}")
    text = out["text"]
    env_part = text.split("== env", 1)[1].split("== devices", 1)[0]
    dev_part = text.split("== devices", 1)[1].split("== end", 1)[0]
    env = dict(line.split("=", 1) for line in env_part.strip().splitlines() if "=" in line)
    devices = {}
    for line in dev_part.strip().splitlines():
        path, numbers = line.rsplit(" ", 1)
        major, minor = numbers.split(":")
        devices[path] = (int(major, 16), int(minor, 16))
    return ContainerView(env=env, devices=devices)


def claim_uids(api, namespace: str, pod: str) -> dict[str, str]:
    """Pod claim name -> ResourceClaim UID."""
    status = helpers.get_pod(api, namespace, pod).get("status", {})
    uids = {}
    for entry in status.get("resourceClaimStatuses", []):
        claim = helpers.get_resource_claim(api, namespace, entry["resourceClaimName"])
        uids[entry["name"]] = claim["metadata"]["uid"]
    return uids


@dataclass(frozen=True)
class CdiEdits:
    env: dict[str, str]
    device_nodes: dict[str, str]  # container path -> host path


def cdi_edits(cdi_dir: Path, claim_uid: str) -> CdiEdits:
    """The container edits of every CDI device (and spec) written for ``claim_uid``."""
    env: dict[str, str] = {}
    nodes: dict[str, str] = {}
    specs = [p for p in cdi_dir.glob("*.json") if claim_uid in p.name]
    assert specs, f"no CDI spec for claim {claim_uid} in {cdi_dir}: {os.listdir(cdi_dir)}"
    for path in specs:
        spec = json.loads(path.read_text())
        edits = [spec.get("containerEdits", {})] + [d["containerEdits"] for d in spec["devices"]]
        for edit in edits:
            env.update(e.split("=", 1) for e in edit.get("env", []))
            nodes.update(
                {n["path"]: n.get("hostPath", n["path"]) for n in edit.get("deviceNodes", [])}
            )
    return CdiEdits(env=env, device_nodes=nodes)


def plain_fake_device(index: int) -> list[dict[str, Any]]:
    """A selector for the fake backend's plain device ``dev-<index>``."""
    attrs = 'device.attributes["fake.dra-core.dev"]'
    return [{"cel": {"expression": f'{attrs}.model == "fake-basic" && {attrs}.index == {index}'}}]


def host_numbers(path: str) -> tuple[int, int]:
    st = os.stat(path)
    assert stat.S_ISCHR(st.st_mode), f"{path} on the host is not a character device"
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def assert_sees(view: ContainerView, edits: CdiEdits) -> None:
    """The container has every env var and device node of the CDI edits, with the host's
    numbers."""
    for key, value in edits.env.items():
        assert view.env.get(key) == value, (
            f"container env {key}={view.env.get(key)!r}, want {value!r}"
        )
    for path, host_path in edits.device_nodes.items():
        assert path in view.devices, f"{path} missing in the container: {sorted(view.devices)}"
        assert view.devices[path] == host_numbers(host_path), path
