"""An in-memory fake of the API server's ResourceSlice and Node endpoints, for unit tests of
code that talks to the API (it has the ``request`` and ``get`` of
:class:`~dra_core.kube.client.KubeClient`)::

    from dra_core.testing.fakeapi import FakeApi

    api = FakeApi(gates_off=("DRADeviceTaints",))
    api.nodes["node-1"] = "uid-1"              # a Node the code may look up
    api.failures.append(ApiError("PUT", "...", 500, "boom"))  # the next request fails

It behaves like the real one where the slice publisher cares: resource versions and 409 on stale
updates, 409 on creating an existing name, 404s, field selectors, quantities returned in
canonical form, ``timeAdded`` stamped on taints, gated fields dropped when a gate is off,
dry-run creates (logged as ``DRYRUN``, nothing stored) and the counter layout of 1.35+ or, with
``counters_beside``, of 1.34 (counter sets in the slice of the devices that consume them).

What it does not do, for which a test needs the real API server (the ``dra_control_plane``
fixture): any other resource (claims, pods, DeviceClasses), watches, label selectors,
validation of the objects (names, limits, CEL) and admission, authentication, and server-side
apply. ``request`` fails with ``AssertionError`` on a path it does not serve.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from dra_core.kube.client import ApiError
from dra_core.quantity import parse_quantity

__all__ = ("SLICES", "FakeApi", "canonical")

SLICES = "/apis/resource.k8s.io/v1/resourceslices"


def canonical(q: str) -> str:
    """Like the API server: binary quantities in the largest exact binary unit."""
    value = parse_quantity(q)
    if q.endswith("i") and value == int(value):
        v = int(value)
        for suffix, unit in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
            if v and v % unit == 0:
                return f"{v // unit}{suffix}"
    return q


def _canon_counters(counters: Mapping[str, Any]) -> dict[str, Any]:
    return {k: {"value": canonical(v["value"])} for k, v in counters.items()}


class FakeApi:
    """The fake server plus a KubeClient-compatible ``request``/``get``.

    ``gates_off`` names feature gates the fake server has off (their fields are dropped as the
    real one drops them), ``version`` is what ``/version`` answers. Tests read ``slices`` (by
    name), ``log`` (method and path of every request), ``writes()``; they make requests fail
    by appending to ``failures`` and run code between a write and its effect with
    ``before_write(method, name)``."""

    def __init__(
        self,
        *,
        gates_off: tuple[str, ...] = (),
        counters_beside: bool = False,
        version: str = "v1.37.2",
    ) -> None:
        self.slices: dict[str, dict[str, Any]] = {}
        self.version = version
        self.api: Any = None  # KubeClient.api: no real client behind this one
        self.nodes: dict[str, str] = {}
        self.gates_off = set(gates_off)
        self.counters_beside = counters_beside
        self.log: list[tuple[str, str]] = []
        self.failures: list[ApiError] = []
        #: Called with the method and the slice's name before a write is applied.
        self.before_write: Callable[[str, str], None] | None = None
        self._rv = 100
        self._lock = threading.RLock()

    # -- what the publisher calls -------------------------------------------------------------
    def get(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        with self._lock:
            if self.failures:
                raise self.failures.pop(0)
            if (query or {}).get("dryRun") == "All":
                self.log.append(("DRYRUN", path))
                body = copy.deepcopy(body)
                body["metadata"]["name"] = body["metadata"].pop("generateName") + "x"
                return self._server_side(body, None)
            self.log.append((method, path))
            if path == "/version":
                return {"gitVersion": self.version}
            if path == "/apis/resource.k8s.io":
                return {"versions": [{"version": "v1"}]}
            if path.startswith("/api/v1/nodes/"):
                name = path.rsplit("/", 1)[1]
                if name not in self.nodes:
                    raise ApiError(method, path, 404, f'nodes "{name}" not found')
                return {"metadata": {"name": name, "uid": self.nodes[name]}}
            if path == SLICES and method == "GET":
                return self._list((query or {}).get("fieldSelector", ""))
            if path == SLICES and method == "POST":
                return self._create(body)
            if not path.startswith(f"{SLICES}/"):
                self._refuse(method, path)
            name = path[len(SLICES) + 1 :]
            if method == "GET":
                if name not in self.slices:
                    raise ApiError(method, path, 404, "not found")
                return copy.deepcopy(self.slices[name])
            if method == "PUT":
                return self._update(name, body)
            if method == "DELETE":
                if self.before_write:
                    self.before_write(method, name)
                if name not in self.slices:
                    raise ApiError(method, path, 404, "not found")
                del self.slices[name]
                return {"kind": "Status", "status": "Success"}
            self._refuse(method, path)

    # -- for the tests ------------------------------------------------------------------------
    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.log if m in ("POST", "PUT", "DELETE")]

    def put_raw(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as someone else would (no canonicalisation)."""
        with self._lock:
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = self._next_rv()
            obj["metadata"].setdefault("uid", str(uuid.uuid4()))
            self.slices[obj["metadata"]["name"]] = obj
            return obj

    def pool_slices(self) -> list[dict[str, Any]]:
        return [self.slices[n] for n in sorted(self.slices)]

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _refuse(method: str, path: str) -> NoReturn:
        msg = (
            f"the fake API server does not serve {method} {path}; test this against the real "
            "API server (the dra_control_plane fixture)"
        )
        raise AssertionError(msg)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _list(self, selector: str) -> dict[str, Any]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = []
        for name in sorted(self.slices):
            obj = self.slices[name]
            spec = obj["spec"]
            if wanted.get("spec.nodeName", spec.get("nodeName")) != spec.get("nodeName"):
                continue
            if wanted.get("spec.driver", spec.get("driver")) != spec.get("driver"):
                continue
            items.append(copy.deepcopy(obj))
        return {"metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _server_side(self, body: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        spec = obj["spec"]
        if "DRAPartitionableDevices" in self.gates_off:
            spec.pop("sharedCounters", None)
        if "DRAPartitionableDevices" not in self.gates_off and self.counters_beside:
            here = {c["name"] for c in spec.get("sharedCounters") or ()}
            for device in spec.get("devices") or ():
                for c in device.get("consumesCounters") or ():
                    if c["counterSet"] not in here:
                        raise ApiError(
                            "POST",
                            SLICES,
                            422,
                            "must reference a counterSet defined in the "
                            "ResourceSlice sharedCounters",
                        )
        elif spec.get("devices") is not None and spec.get("sharedCounters") is not None:
            raise ApiError("POST", SLICES, 422, "only one of sharedCounters or devices is allowed")
        for counter_set in spec.get("sharedCounters") or ():
            counter_set["counters"] = _canon_counters(counter_set["counters"])
        for device in spec.get("devices") or ():
            if "DRAPartitionableDevices" in self.gates_off:
                device.pop("consumesCounters", None)
            if "DRAConsumableCapacity" in self.gates_off:
                device.pop("allowMultipleAllocations", None)
                for cap in (device.get("capacity") or {}).values():
                    cap.pop("requestPolicy", None)
            if "DRADeviceTaints" in self.gates_off:
                device.pop("taints", None)
            for cap in (device.get("capacity") or {}).values():
                cap["value"] = canonical(cap["value"])
            for c in device.get("consumesCounters") or ():
                c["counters"] = _canon_counters(c["counters"])
            for t in device.get("taints") or ():
                t.setdefault("timeAdded", "2026-11-26T00:00:00Z")
        meta = obj["metadata"]
        meta["resourceVersion"] = self._next_rv()
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta["creationTimestamp"] = "2026-11-26T00:00:00Z"
        return obj

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if self.before_write:
            self.before_write("POST", name)
        if name in self.slices:
            raise ApiError("POST", SLICES, 409, f'resourceslices "{name}" already exists')
        obj = self._server_side(body, None)
        self.slices[name] = obj
        return copy.deepcopy(obj)

    def _update(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.before_write:
            self.before_write("PUT", name)
        old = self.slices.get(name)
        if old is None:
            raise ApiError("PUT", f"{SLICES}/{name}", 404, "not found")
        if body["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
            raise ApiError("PUT", f"{SLICES}/{name}", 409, "the object has been modified")
        obj = self._server_side(body, old)
        self.slices[name] = obj
        return copy.deepcopy(obj)
