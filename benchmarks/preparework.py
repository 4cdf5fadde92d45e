"""The work of a prepare and an unprepare in dra-core's claim service, in instructions.

`compare.py` times prepares end to end, and on a shared machine its figures move by a third
from one hour to the next. This benchmark counts what the Python side of a prepare costs, the
same for the same code whatever else the machine does: an agent (``Agent`` with the fake
backend, no publishing) on real files (checkpoint, CDI specs, lock) prepares a claim and
unprepares it, one claim at a time, through its claim service, the claims read from memory
instead of the API server (the read's HTTP and the kubelet's gRPC are not counted). It runs
twice under ``valgrind --tool=callgrind``, with few and with many claims; the difference,
divided by the difference in claims, is the work of one prepare and its unprepare, start-up
and the warm-up excluded.

The kubelet's calls are counted the same way, on their own: the kubelet plugin's gRPC server
(`dra_core.kubelet.grpcserver`: HTTP/2, protobuf, dispatch) answering NodePrepareResources
calls of one claim each, from a grpcio client in another process, with a servicer that answers
at once; each prepare and each unprepare costs one such call besides the claim service's work.

Usage: ``python3 benchmarks/preparework.py [--claims 20 120] [--json]`` (about two minutes).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from startwork import instructions, show

#: Claims prepared (and unprepared) before the counted part: caches, threads, first imports.
WARM_UP = 20
#: The devices of the agent, as many in both runs (discovery is not part of the count).
DEVICES = 1000
NODE = "node-1"


class ClaimsInMemory:
    """The API server as far as an agent without publishing reads it: allocated
    ResourceClaims by path, and ``/version``, which reconciliation asks first (were it
    missing, the agent would retry, and log the failure, every 2 s while it is counted)."""

    timeout = 10.0

    def __init__(self) -> None:
        self.claims: dict[str, dict[str, Any]] = {"/version": {"gitVersion": "v1.37.2"}}

    def get(self, path: str, query: Any = None, *, timeout: float | None = None) -> Any:
        return self.claims[path]

    def request(self, *args: Any, **kwargs: Any) -> Any:  # events the agent records
        return {}


def work(claims: int, root: Path) -> None:
    """Prepare and unprepare ``claims`` claims, one at a time, one per call."""
    from dra_core.kube.claims import claim_path
    from dra_core.logs import configure_logging
    from dra_core.model import ClaimRef
    from dra_core.plugins import load
    from dra_core.runtime import Agent, AgentSettings

    configure_logging("INFO")
    if claims > DEVICES:
        msg = f"at most {DEVICES} claims: the agent has {DEVICES} devices"
        raise ValueError(msg)
    settings = AgentSettings.below(
        root, NODE, publish=False, http_port=0, backend_options={"devices": str(DEVICES)}
    )
    api = ClaimsInMemory()
    agent = Agent(settings, load("fake"), client=api)  # type: ignore[arg-type]
    agent.start()
    service = agent.service
    assert service is not None
    refs = []
    for index in range(claims):
        ref = ClaimRef("default", f"claim-{index}", str(uuid.uuid4()))
        result = {"request": "dev", "driver": agent.driver, "pool": NODE, "device": f"dev-{index}"}
        api.claims[claim_path(ref)] = {
            "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
            "status": {"allocation": {"devices": {"results": [result]}}},
        }
        refs.append(ref)
    for ref in refs:
        answer = service.prepare([ref])[ref.uid]
        if answer.error:
            raise RuntimeError(answer.error)
        error = service.unprepare([ref])[ref.uid]
        if error:
            raise RuntimeError(error)
    agent.stop()


def serve_calls(calls: int, path: Path) -> None:
    """Serve the DRA service on ``path`` until ``calls`` calls are answered, then exit."""
    import os
    import threading
    import time

    from dra_core.kubelet.grpcserver import CallContext, GrpcServer
    from dra_core.kubelet.proto import dra_v1_pb2

    answered = threading.Semaphore(0)

    class Servicer:
        def NodePrepareResources(
            self, request: Any, context: CallContext
        ) -> dra_v1_pb2.NodePrepareResourcesResponse:
            response = dra_v1_pb2.NodePrepareResourcesResponse()
            for claim in request.claims:
                device = response.claims[claim.uid].devices.add()
                device.request_names.append("dev")
                device.pool_name, device.device_name = NODE, "dev-0"
                device.cdi_device_ids.append(f"k8s.fake.dra-core.dev/claim={claim.uid}-dev-0")
            answered.release()
            return response

        def NodeUnprepareResources(
            self, request: Any, context: CallContext
        ) -> dra_v1_pb2.NodeUnprepareResourcesResponse:
            return dra_v1_pb2.NodeUnprepareResourcesResponse()

    server = GrpcServer("dra", workers=8)
    server.add_service(dra_v1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"], Servicer())
    server.listen(path)
    server.start()
    for _ in range(calls):
        answered.acquire()
    time.sleep(0.2)  # the last answer goes out (a process at rest runs no instructions)
    os._exit(0)


def make_calls(calls: int, path: Path) -> None:
    """``calls`` NodePrepareResources calls of one claim each, one after the other."""
    import time

    import grpc

    from dra_core.kubelet.proto import dra_v1_pb2, dra_v1_pb2_grpc

    while not path.exists():
        time.sleep(0.05)
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = dra_v1_pb2_grpc.DRAPluginStub(channel)
        for index in range(calls):
            claim = dra_v1_pb2.Claim(namespace="default", name=f"c{index}", uid=str(uuid.uuid4()))
            request = dra_v1_pb2.NodePrepareResourcesRequest(claims=[claim])
            stub.NodePrepareResources(request, timeout=120)


def differenced(low: int, high: int, count: Callable[[int, Path], int]) -> float:
    """Instructions per claim: (``count`` of ``high`` claims - of ``low``) / (high - low),
    each run in a temporary directory of its own."""
    counts = []
    for claims in (low, high):
        with tempfile.TemporaryDirectory(prefix="dra-preparework-", dir="/tmp") as tmp:
            counts.append(count(claims, Path(tmp)))
    return (counts[1] - counts[0]) / (high - low)


def count_claims(claims: int, tmp: Path) -> int:
    """The instructions of `work` for ``claims`` claims."""
    argv = [sys.executable, __file__, "--child", str(claims), str(tmp)]
    return instructions(argv, Path(__file__).parent)


def count_calls(calls: int, tmp: Path) -> int:
    """The instructions of `serve_calls` answering ``calls`` calls of `make_calls`."""
    path = tmp / "dra.sock"
    with subprocess.Popen([sys.executable, __file__, "--calls", str(calls), str(path)]) as caller:
        server = [sys.executable, __file__, "--serve", str(calls), str(path)]
        count = instructions(server, Path(__file__).parent)
        caller.wait(60)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--claims",
        nargs=2,
        type=int,
        default=(20, 120),
        metavar=("FEW", "MANY"),
        help="claims of the two runs (default 20 120)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, help=argparse.SUPPRESS)
    parser.add_argument("root", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        work(WARM_UP + args.child, args.root)
        return 0
    if args.serve is not None:
        serve_calls(WARM_UP + args.serve, args.root)
        return 0
    if args.calls is not None:
        make_calls(WARM_UP + args.calls, args.root)
        return 0
    if shutil.which("valgrind") is None:
        print(
            "preparework.py: valgrind is not installed (apt-get install valgrind)", file=sys.stderr
        )
        return 1
    low, high = args.claims
    if not 0 <= low < high <= DEVICES - WARM_UP:
        parser.error(f"--claims: FEW must be below MANY, and MANY at most {DEVICES - WARM_UP}")
    counts = {
        "claim service, prepare and unprepare": round(differenced(low, high, count_claims)),
        "gRPC server, one call": round(differenced(low, high, count_calls)),
    }
    show(counts, "instructions per claim", sys.executable, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
