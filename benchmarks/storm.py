"""A prepare storm: CLAIMS claims prepared at once on one node, with the client-side limiter on.

One agent (``python -m dra_core run --backend fake --devices CLAIMS``, a process of its own,
with its default limits, 50 requests/s and bursts of 100, unless ``--qps`` / ``--burst``) on
a fake Node of the test control plane; CLAIMS one-device claims, each used by a pod pinned to
that node, allocated by the real scheduler; then one NodePrepareResources call per claim, all
released together (the ``bench_concurrent`` figure of benchmarks/run.py). Figures: time until
the last reply, per-call latency p50/p99, errors (goal 0), and the requests/s the API server
saw (its ``apiserver_request_total``, sampled every second: mean and highest second).

Usage: ``python3 benchmarks/storm.py [--claims 1000] [--qps 50 --burst 100] [--json out.json]``.
See benchmarks/README.md ("Prepare storm").
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from agents import ApiServer, spawn, wait_started
from compare import DRA_CORE, Agent
from run import (
    FAKE_AGENT,
    Cluster,
    Report,
    add_cluster_options,
    allocate_claims,
    bench_concurrent,
    cluster_kubeconfig,
    machine_info,
    progress,
    wait_for_api,
    warnings_only,
)

from dra_core.kube.client import load_client
from dra_core.kube.ratelimit import BURST_ENV, DEFAULT_BURST, DEFAULT_QPS, QPS_ENV
from dra_core.model import ClaimRef
from dra_core.testing.kubelet import FakeKubelet

#: What the API server counts for the agent's reads of the claims.
CLAIM_READS = ("GET", "resourceclaims")


class RateSampler:
    """Samples the API server's count of claim reads every second, in a thread."""

    def __init__(self, server: ApiServer, period: float = 1.0) -> None:
        self._server = server
        self._period = period
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, name="rate-sampler", daemon=True)

    def __enter__(self) -> RateSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._sample()

    def _sample(self) -> None:
        totals, _ = self._server.snapshot()
        self.samples.append((time.monotonic(), totals[CLAIM_READS]))

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def reads(self) -> int:
        return self.samples[-1][1] - self.samples[0][1]

    def busiest_second(self) -> float:
        """The highest rate between two consecutive samples (requests/s)."""
        pairs = zip(self.samples, self.samples[1:], strict=False)
        return max(((n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in pairs), default=0.0)


def storm(
    report: Report,
    cluster: Cluster,
    kubeconfig: str,
    root: Path,
    claims: int,
    progress: Callable[[str], None],
    limits: tuple[float, int] = (DEFAULT_QPS, DEFAULT_BURST),
) -> None:
    suffix = uuid.uuid4().hex[:6]
    agent = Agent(
        name=DRA_CORE,
        program=FAKE_AGENT,
        root=root / "agent",
        node=f"storm-{suffix}",
        devices=claims,
        qps=limits[0],
        burst=limits[1],
    )
    namespace = f"storm-{suffix}"
    server = ApiServer(cluster.client)
    with ExitStack() as stack:
        cluster.create_namespace(stack, namespace)
        cluster.create_node(agent.node, pods=claims + 10)
        stack.callback(cluster.delete_node, agent.node)
        stack.callback(agent.stop)
        cluster.create_device_class(stack, agent.node, agent.driver)
        progress(f"starting the agent with {claims} devices ...")
        spawn(agent, kubeconfig, {QPS_ENV: f"{limits[0]:g}", BURST_ENV: str(limits[1])})
        wait_started(cluster, [agent], timeout=120)
        progress(f"allocating {claims} claims (the scheduler) ...")
        started = time.perf_counter()
        names = [f"storm-{i}" for i in range(claims)]
        refs: list[ClaimRef] = allocate_claims(cluster, namespace, agent.node, agent.node, names)
        report.info["allocation_seconds"] = round(time.perf_counter() - started, 1)
        progress(f"{claims} prepares at once ...")
        with FakeKubelet(agent.registration_socket) as kubelet:
            kubelet.register()
            with RateSampler(server) as rates:
                bench_concurrent(report, kubelet, refs)
    report.add(
        "storm_claim_reads", "API server: claim reads (GET resourceclaims)", rates.reads(), ""
    )
    seconds = next(f.value for f in report.figures if f.key == "concurrent_seconds")
    report.add(
        "storm_reads_per_s_mean",
        "API server: claim reads/s, mean over the storm",
        rates.reads() / seconds,
        "req/s",
        f"<= {limits[0]:g} after a burst of {limits[1]}" if limits[0] > 0 else "no limit",
    )
    report.add(
        "storm_reads_per_s_max",
        "API server: claim reads/s, busiest second",
        rates.busiest_second(),
        "req/s",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=1000, help="claims prepared at once (1000)")
    parser.add_argument(
        "--qps",
        type=float,
        default=DEFAULT_QPS,
        help=f"the agent's limit ({DEFAULT_QPS:g}; 0: none)",
    )
    parser.add_argument(
        "--burst", type=int, default=DEFAULT_BURST, help=f"the agent's burst ({DEFAULT_BURST})"
    )
    add_cluster_options(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings_only()
    info = {"claims": args.claims, "qps": args.qps, "burst": args.burst}
    report = Report(info={**machine_info(), **info})
    root = Path(tempfile.mkdtemp(prefix="dra-storm-", dir="/tmp"))  # short socket paths
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        kubeconfig = cluster_kubeconfig(stack, args.kubeconfig, progress)
        client = load_client(kubeconfig, timeout=30, qps=0)
        wait_for_api(client)
        limits = (args.qps, args.burst)
        storm(report, Cluster(client), kubeconfig, root, args.claims, progress, limits)
    print(report.table())
    print(json.dumps(report.info))
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.as_dict()["figures"].get("concurrent_errors", 1) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
