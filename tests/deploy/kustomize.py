"""A small subset of kustomize, enough to load ``deploy/`` without the kustomize binary.

Supported: ``resources`` (files and directories with a kustomization), ``patches`` given as
JSON 6902 operation lists (add, replace, remove, test) with a ``target`` (kind/name),
``images`` (newName/newTag) and ``namespace`` (set on namespaced objects that have none).
Anything else in a kustomization raises :class:`Unsupported`, so a test notices when the
manifests outgrow this loader.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "DeviceClass",
    "PriorityClass",
}


class Unsupported(Exception):
    """The kustomization uses a feature this loader does not implement."""


class PatchTestFailed(Exception):
    """A JSON 6902 ``test`` operation did not hold (kustomize fails the build the same way)."""


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no kustomization file in {directory}")


def read_kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(kustomization_file(directory).read_text())
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise Unsupported(f"{directory}: unsupported kustomization keys {sorted(unknown)}")
    return data


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path``."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` would produce (for the supported subset)."""
    directory = directory.resolve()
    k = read_kustomization(directory)
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(build(path))
        else:
            objects.extend(load_documents(path))
    for patch in k.get("patches", []):
        _apply_patch(directory, patch, objects)
    for image in k.get("images", []):
        _set_image(image, objects)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"].setdefault("namespace", k["namespace"])
    return objects


def _apply_patch(directory: Path, patch: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    if "path" not in patch or "target" not in patch:
        raise Unsupported(f"{directory}: only patches with path and target are supported")
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise Unsupported(f"{directory}: {patch['path']} is not a JSON 6902 patch (a list)")
    target = patch["target"]
    matched = [
        o
        for o in objects
        if o["kind"] == target.get("kind", o["kind"])
        and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
    ]
    if not matched:
        raise ValueError(f"{directory}: patch {patch['path']} matches no object: {target}")
    for obj in matched:
        patched = json_patch(obj, ops)
        obj.clear()
        obj.update(patched)


def _set_image(image: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        pod_spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name != image["name"]:
                continue
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply RFC 6902 ``add``, ``replace``, ``remove`` and ``test`` operations to a copy of
    ``document``; a failed ``test`` raises :class:`PatchTestFailed`, as kustomize fails."""
    doc = copy.deepcopy(document)
    for op in operations:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "test":
            try:
                actual = node[int(last)] if isinstance(node, list) else node[last]
            except (IndexError, KeyError, ValueError):
                raise PatchTestFailed(f"test of missing {op['path']}") from None
            if actual != op["value"]:
                raise PatchTestFailed(f"test of {op['path']}: {actual!r} != {op['value']!r}")
            continue
        if isinstance(node, list):
            if kind == "add":
                index = len(node) if last == "-" else int(last)
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[int(last)]
            else:
                raise Unsupported(f"JSON patch op {kind!r}")
        elif kind == "add":
            node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if last not in node:
                raise KeyError(f"replace of missing {op['path']}")
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        else:
            raise Unsupported(f"JSON patch op {kind!r}")
    return doc
