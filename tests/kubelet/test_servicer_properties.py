"""Arbitrary NodePrepareResources and NodeUnprepareResources requests through the real gRPC
servicer on a real unix socket, in front of the real claim service (real checkpoint, CDI
specs and lock; the API server is a table of allocated claims).

Whatever the request holds (UIDs, namespaces and names random, empty, huge, non-ASCII,
duplicated, or a known UID under another name), every call answers, with one entry per
distinct UID, each prepared or carrying an error that names the claim; the RPC never fails
with an unhandled exception, and a prepared claim is never released by a request that
names it wrongly. Raw requests that are not valid protobuf (invalid UTF-8 in a string) get a
clean RPC error, and the server goes on serving.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dra_core import BackendIdentity, ContainerEdits, Device, Inventory, PreparedDevice, hookimpl
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import claim_path
from dra_core.kube.client import ApiError
from dra_core.kubelet import KubeletPlugin, KubeletPluginSettings
from dra_core.kubelet.proto import dra_v1_pb2, dra_v1_pb2_grpc, dra_v1beta1_pb2
from dra_core.model import ClaimRef
from dra_core.node.lock import DriverLock
from dra_core.node.service import ClaimService
from dra_core.plugins import from_objects

from .conftest import DRIVER

NODE = "node-1"
BOOT = "boot-1"
DEVICES = 6
_MESSAGES: dict[str, ModuleType] = {"v1": dra_v1_pb2, "v1beta1": dra_v1beta1_pb2}
_SERVICES = {
    "v1": "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
    "v1beta1": "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
}


class Backend:
    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(DRIVER, "dra-core.dev", "properties")

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[PreparedDevice]:
        return [PreparedDevice(d, ContainerEdits(env={"DEVICE": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: Any) -> bool:
        return True


class ApiClaims:
    """The API server as far as reading claims goes: allocated ones, and one that is not."""

    timeout = 10.0

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def add(self, ref: ClaimRef, device: str | None) -> ClaimRef:
        claim: dict[str, Any] = {
            "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid}
        }
        if device is not None:
            result = {"request": "dev", "driver": DRIVER, "pool": NODE, "device": device}
            claim["status"] = {"allocation": {"devices": {"results": [result]}}}
        self.objects[claim_path(ref)] = claim
        return ref

    def get(self, path: str, query: Any = None, *, timeout: float | None = None) -> Any:
        if path not in self.objects:
            raise ApiError("GET", path, 404, "not found")
        return self.objects[path]


@dataclass
class Served:
    service: ClaimService
    channel: grpc.Channel
    #: Claims the API server holds, allocated (the last one is not).
    known: list[ClaimRef]
    #: A prepared claim no request names correctly: it must stay prepared throughout.
    sentinel: ClaimRef


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    root = Path(tempfile.mkdtemp(prefix="dk-prop-", dir="/tmp"))
    api = ApiClaims()
    known = [
        api.add(ClaimRef("default", f"claim-{i}", str(uuid.uuid4())), f"dev-{i}")
        for i in range(DEVICES - 1)
    ]
    known.append(api.add(ClaimRef("team-a", "unallocated", str(uuid.uuid4())), None))
    sentinel = api.add(ClaimRef("kube-system", "sentinel", str(uuid.uuid4())), f"dev-{DEVICES}")
    service = ClaimService(
        hooks=from_objects("properties", Backend()),
        context=NodeContext(node_name=NODE, driver_name=DRIVER),
        client=api,  # type: ignore[arg-type]
        checkpoint=Checkpoint.open(root / "plugin" / "checkpoint.json", boot_id=BOOT),
        cdi=CdiSpecs(root / "cdi", Backend().dra_backend_identity()),
        lock=DriverLock(root / "plugin" / "serialize.lock"),
        inventory=lambda: Inventory(devices=tuple(Device(f"dev-{i}") for i in range(DEVICES + 1))),
        pools={NODE},
        boot_id=BOOT,
    )
    assert service.prepare([sentinel])[sentinel.uid].error == ""
    plugin = KubeletPlugin(
        KubeletPluginSettings(
            driver_name=DRIVER, registration_dir=root / "registry", plugin_dir=root / "plugin"
        ),
        service,
    )
    plugin.start()
    channel = grpc.insecure_channel(
        f"unix://{plugin.dra_socket}",
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    try:
        yield Served(service, channel, known, sentinel)
    finally:
        channel.close()
        plugin.stop(grace=0)
        shutil.rmtree(root, ignore_errors=True)


# -- strategies --------------------------------------------------------------------------------

_TEXT = st.characters(exclude_categories=("Cs",))  # protobuf strings are valid Unicode
_DNS_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?", fullmatch=True)
_HUGE = st.builds(lambda c, n: c * n, _TEXT, st.integers(1_000, 100_000))
_ANY_TEXT = st.one_of(st.just(""), _DNS_LABEL, st.text(_TEXT, max_size=80), _HUGE)
_UID = st.one_of(
    st.builds(lambda: str(uuid.uuid4())),
    st.builds(lambda: str(uuid.uuid4()).upper()),
    _ANY_TEXT,
)


@dataclass(frozen=True)
class Entry:
    namespace: str
    name: str
    uid: str


def entries(served: Served) -> st.SearchStrategy[Entry]:
    known = st.sampled_from(served.known)
    sentinel = served.sentinel
    return st.one_of(
        known.map(lambda r: Entry(r.namespace, r.name, r.uid)),  # as the kubelet sends them
        st.builds(lambda r, ns, n: Entry(ns, n, r.uid), known, _ANY_TEXT, _ANY_TEXT),
        st.builds(Entry, _ANY_TEXT, _ANY_TEXT, _UID),
        st.builds(lambda ns, n: Entry(ns, n, sentinel.uid), _ANY_TEXT, _ANY_TEXT).filter(
            lambda e: (e.namespace, e.name) != (sentinel.namespace, sentinel.name)
        ),
    )


@st.composite
def requests(draw: st.DrawFn, served: Served) -> list[Entry]:
    claims = draw(st.lists(entries(served), max_size=8))
    if claims:  # the same UID again, under the same or another name
        claims += draw(st.lists(st.sampled_from(claims), max_size=3))
        claims = draw(st.permutations(claims))
    return claims


# -- checks ------------------------------------------------------------------------------------


def _check_error_names_the_claim(uid: str, error: str) -> None:
    assert error.strip(), f"claim {uid!r}: an empty error"
    if uid:
        assert uid in error or repr(uid)[1:-1] in error or "malformed claim" in error, error
    else:
        assert "empty UID" in error


def _call(served: Served, api: str, call: str, claims: list[Entry]) -> Any:
    messages = _MESSAGES[api]
    request_type = getattr(messages, f"{call}Request")
    response_type = getattr(messages, f"{call}Response")
    method = served.channel.unary_unary(
        f"/{_SERVICES[api]}/{call}",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    request = request_type(
        claims=[messages.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
    )
    return method(request, timeout=60.0)


@pytest.mark.parametrize("api", ["v1", "v1beta1"])
def test_every_prepare_request_gets_an_entry_or_an_error_per_claim(
    served: Served, api: str
) -> None:
    @given(requests(served))
    def check(claims: list[Entry]) -> None:
        response = _call(served, api, "NodePrepareResources", claims)
        assert set(response.claims) == {c.uid for c in claims}
        for uid, entry in response.claims.items():
            if entry.error:
                assert not entry.devices
                _check_error_names_the_claim(uid, entry.error)
            else:
                assert entry.devices, f"claim {uid!r}: neither devices nor an error"
        sentinel = served.sentinel
        if sentinel.uid in response.claims:  # never under its own name: malformed or refused
            assert response.claims[sentinel.uid].error

    check()


@pytest.mark.parametrize("api", ["v1", "v1beta1"])
def test_every_unprepare_request_gets_an_entry_per_claim_and_spares_misnamed_claims(
    served: Served, api: str
) -> None:
    @given(requests(served))
    def check(claims: list[Entry]) -> None:
        response = _call(served, api, "NodeUnprepareResources", claims)
        assert set(response.claims) == {c.uid for c in claims}
        for uid, entry in response.claims.items():
            if entry.error:
                _check_error_names_the_claim(uid, entry.error)
        sentinel = served.sentinel
        if sentinel.uid in response.claims:  # never under its own name: malformed or refused
            assert response.claims[sentinel.uid].error
        record = served.service.checkpoint.get(sentinel.uid)
        assert record is not None and record.claim.ref == sentinel

    check()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    length = len(payload)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(varint) + payload


_RAW_CLAIM = st.builds(
    lambda ns, uid, name: _field(1, _field(1, ns) + _field(2, uid) + _field(3, name)),
    st.binary(max_size=40),
    st.binary(max_size=40),
    st.binary(max_size=40),
)


@pytest.mark.parametrize("call", ["NodePrepareResources", "NodeUnprepareResources"])
def test_raw_requests_with_any_bytes_in_their_strings_get_an_answer_or_a_clean_rpc_error(
    served: Served, call: str
) -> None:
    method = served.channel.unary_unary(
        f"/{_SERVICES['v1']}/{call}",
        request_serializer=lambda raw: raw,
        response_deserializer=getattr(dra_v1_pb2, f"{call}Response").FromString,
    )

    @given(st.lists(_RAW_CLAIM, max_size=5))
    def check(raw_claims: list[bytes]) -> None:
        try:
            response = method(b"".join(raw_claims), timeout=60.0)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            # Not valid UTF-8: refused by the protobuf decoder before the servicer sees it.
            assert exc.code() == grpc.StatusCode.INTERNAL, exc
            assert any(byte >= 0x80 for raw in raw_claims for byte in raw)
        else:
            for entry in response.claims.values():
                if call == "NodePrepareResources":
                    assert bool(entry.error) != bool(entry.devices)
        # The server goes on serving.
        stub = dra_v1_pb2_grpc.DRAPluginStub(served.channel)
        assert (
            stub.NodeUnprepareResources(dra_v1_pb2.NodeUnprepareResourcesRequest(), timeout=10.0)
            == dra_v1_pb2.NodeUnprepareResourcesResponse()
        )

    check()
