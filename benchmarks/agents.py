"""N node agents on one API server: what each costs the API server, in connections and CPU.

For each N (default 1, 10, 30) and each agent (dra-core, then the Go reference of
benchmarks/goref), N agents are started at once, each a process of its own on its own fake
Node (``python -m dra_core run --backend fake`` with its default rate limit; ``goref``), on
a bare test API server (no scheduler or controller-manager, which would send requests of their
own), and measured from outside:

- requests per node to start and per minute at rest, from the API server's own
  ``apiserver_request_total`` by verb and resource, less the benchmark's own requests, counting
  only the resources the agents use and the paths outside the resources (discovery, /version),
  and leaving out what the API server was seen to send itself before any agent started; the
  watches each agent holds open, from ``apiserver_longrunning_requests``;
- TCP connections from each agent to the API server (`dra_core.testing.proc.connections`: its
  socket inodes matched with the ESTABLISHED entries of ``/proc/<pid>/net/tcp*``), once started
  and at the end of the rest period;
- CPU of each agent: from spawn until started (registered, devices published, settled;
  ``/proc/<pid>/stat``), and per minute at rest (``/proc/<pid>/task/*/schedstat``, ns).

Usage: ``python3 benchmarks/agents.py [--agents 1,10,30] [--idle 60] [--json out.json]``.
``--kubeconfig`` uses a running cluster instead of starting the test control plane.
See benchmarks/README.md ("N agents on one API server").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from compare import DRA_CORE, DRIVERS, GOREF, Agent, build_go, cpu_seconds, settle
from run import (
    FAKE_AGENT,
    RESOURCE_API,
    Cluster,
    add_cluster_options,
    compile_bytecode,
    machine_info,
    progress,
    rss_mib,
    stop_process,
    wait_for_api,
    warnings_only,
)

from dra_core.kube.client import KubeClient, load_client
from dra_core.kube.ratelimit import BURST_ENV, QPS_ENV
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.proc import connections, running_ms

#: The PYTHONPATH of the dra-core agents, when set: measures another tree (`git archive`)
#: with this benchmark.
AGENT_PYTHONPATH = "DRA_AGENT_PYTHONPATH"
#: Devices each agent publishes (one slice).
DEVICES = 8
#: The API server's verb for each of `KubeClient`'s (`dra_core.kube.client.request_verb`).
SERVER_VERBS = {
    "get": "GET",
    "list": "LIST",
    "watch": "WATCH",
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
}
#: The resources either agent reads or writes; requests on others come from the API server's
#: own informers (or the controllers of a full cluster), and are not counted.
AGENT_RESOURCES = frozenset({"resourceslices", "nodes", "resourceclaims", "events"})

Requests = Counter[tuple[str, str]]


# ---------------------------------------------------------------------------- the API server


def parse_metrics(text: str) -> tuple[Requests, Requests]:
    """``apiserver_request_total`` and ``apiserver_longrunning_requests`` of a /metrics page,
    each by (verb, resource), the subresource appended to the resource (``nodes/status``)."""
    totals: Requests = Counter()
    open_: Requests = Counter()
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name not in ("apiserver_request_total", "apiserver_longrunning_requests"):
            continue
        labels_text, _, value = rest.rpartition("} ")
        labels = {}
        for item in labels_text.split('",'):
            key, sep, raw = item.partition("=")
            if sep:
                labels[key] = raw.strip('"')
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource = f"{resource}/{labels['subresource']}"
        target = totals if name == "apiserver_request_total" else open_
        target[(labels.get("verb", ""), resource)] += int(float(value))
    return totals, open_


class ApiServer:
    """The API server's request counts, less the benchmark's own requests."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.scrapes = 0
        #: (verb, resource) of the requests the control plane sends by itself (`background`).
        self.others: set[tuple[str, str]] = set()

    def _own(self) -> Requests:
        own: Requests = Counter()
        for (verb, resource), n in self.client.requests.items():
            own[(SERVER_VERBS.get(verb, verb.upper()), resource)] += n
        return own

    def snapshot(self) -> tuple[Requests, Requests]:
        """(requests of everyone else so far, long-running requests open now)."""
        api = self.client.api
        _, url, headers, _, _ = api.param_serialize(
            method="GET",
            resource_path="/metrics",
            header_params={"Accept": "text/plain"},
            auth_settings=["BearerToken"],
        )
        own = self._own()
        response = api.call_api("GET", url, header_params=headers, _request_timeout=30)
        totals, open_ = parse_metrics(response.read().decode())
        self.scrapes += 1
        own[("GET", "/metrics")] = self.scrapes
        return totals - own, open_

    def background(self, seconds: float) -> None:
        """Learn what the control plane sends by itself, with no agent running: those requests
        (kube-controller-manager's GET /openapi/v3 every few seconds, say) are left out."""
        before, _ = self.snapshot()
        time.sleep(seconds)
        after, _ = self.snapshot()
        self.others = set(self._share(after, before))

    def agents_share(self, after: Requests, before: Requests) -> Requests:
        """What the agents sent between two snapshots."""
        share = self._share(after, before)
        return Counter({k: n for k, n in share.items() if k not in self.others})

    @staticmethod
    def _share(after: Requests, before: Requests) -> Requests:
        delta = after.copy()
        delta.subtract(before)
        return Counter({k: n for k, n in delta.items() if n > 0 and _agents_kind(*k)})


def _agents_kind(verb: str, resource: str) -> bool:
    """Whether an agent may have sent this request: not a watch (the API server counts one when
    it ends, and its own informers' watches end too; open watches are counted apart), on a
    resource the agents use, or a path outside the resources (discovery, /version)."""
    if verb == "WATCH":
        return False
    return resource.startswith("/") or resource.split("/")[0] in AGENT_RESOURCES


def describe(requests: Requests, per: float) -> dict[str, float]:
    """``{"LIST resourceslices": n / per, ...}``, largest first."""
    return {
        f"{verb} {resource}": round(n / per, 3)
        for (verb, resource), n in sorted(requests.items(), key=lambda kv: (-kv[1], kv[0]))
    }


# ---------------------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    """One kind of agent, N of them: the figures, per node (per agent)."""

    side: str
    agents: int
    start_seconds: float
    start_requests: dict[str, float]
    idle_requests_per_minute: dict[str, float]
    watches_open: float
    connections_started: list[int]
    connections_idle: list[int]
    start_cpu_ms: list[float]
    idle_cpu_ms_per_minute: list[float]
    rss_mib: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        start_total = sum(self.start_requests.values())
        idle_total = sum(self.idle_requests_per_minute.values())
        return {
            "side": self.side,
            "agents": self.agents,
            "start_s": round(self.start_seconds, 2),
            "start_requests_per_node": round(start_total, 2),
            "idle_requests_per_node_per_min": round(idle_total, 3),
            "watches_per_node": round(self.watches_open, 2),
            "connections_started_max": max(self.connections_started),
            "connections_idle_max": max(self.connections_idle),
            "start_cpu_ms_median": round(statistics.median(self.start_cpu_ms), 1),
            "idle_cpu_ms_per_min_median": round(statistics.median(self.idle_cpu_ms_per_minute), 1),
            "idle_cpu_ms_per_min_max": round(max(self.idle_cpu_ms_per_minute), 1),
        }


def spawn(agent: Agent, kubeconfig: str, limits: Mapping[str, str] | None = None) -> None:
    """Start ``agent`` without waiting for it (many start at once). A dra-core agent gets the
    environment ``limits`` (`QPS_ENV`, `BURST_ENV`), else its default limits; the Go agent's
    are its flags."""
    for sub in ("registry", "plugins", "cdi"):
        (agent.root / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if agent.name == DRA_CORE:
        env.pop(QPS_ENV, None)
        env.pop(BURST_ENV, None)
        env.update(limits or {})
        if AGENT_PYTHONPATH in os.environ:  # another tree of dra-core, measured by this one
            env["PYTHONPATH"] = os.environ[AGENT_PYTHONPATH]
    log = (agent.root / "agent.log").open("ab")
    with log:
        agent.proc = subprocess.Popen(  # cwd: `-m dra_core` imports from there first
            agent.argv(kubeconfig),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=agent.root,
            env=env,
        )


def registered(agent: Agent) -> bool:
    if agent.proc is not None and agent.proc.poll() is not None:
        msg = (
            f"{agent.name} on {agent.node} exited with {agent.proc.returncode}: {agent.log_tail()}"
        )
        raise RuntimeError(msg)
    if not agent.registration_socket.exists():
        return False
    try:
        with FakeKubelet(agent.registration_socket) as kubelet:
            kubelet.get_info(timeout=1)
    except Exception:  # noqa: BLE001 - not serving yet
        return False
    return True


def published_nodes(cluster: Cluster, driver: str, wanted: int) -> set[str]:
    """Nodes whose ``driver`` slices hold at least ``wanted`` devices."""
    items = cluster.client.get(
        f"{RESOURCE_API}/resourceslices", query={"fieldSelector": f"spec.driver={driver}"}
    )["items"]
    devices: Counter[str] = Counter()
    for item in items:
        devices[item["spec"].get("nodeName", "")] += len(item["spec"].get("devices") or [])
    return {node for node, n in devices.items() if n >= wanted}


def wait_started(cluster: Cluster, agents: Sequence[Agent], timeout: float) -> None:
    """Until every agent answers GetInfo, has published its devices and uses no more CPU."""
    waiting = list(agents)

    def all_registered() -> bool:
        waiting[:] = [a for a in waiting if not registered(a)]
        return not waiting

    cluster.wait(f"{len(agents)} agents to register", all_registered, timeout)
    nodes = {a.node for a in agents}
    driver = DRIVERS[agents[0].name]
    cluster.wait(
        f"{len(agents)} agents to publish",
        lambda: nodes <= published_nodes(cluster, driver, agents[0].devices),
        timeout,
    )
    for agent in agents:
        settle(agent.pid, timeout=timeout)
    time.sleep(2.0)  # the echoes of the last writes reach the watches


def measure(
    setup: Setup, side: str, count: int, idle: float, progress: Callable[[str], None]
) -> Measurement:
    cluster, server = setup.cluster, setup.server
    suffix = uuid.uuid4().hex[:6]
    agents = [
        Agent(
            name=side,
            program=(str(setup.go / "goref"),) if side == GOREF else FAKE_AGENT,
            root=setup.root / f"{side}-{suffix}-{i}",
            node=f"agents-{side}-{suffix}-{i}",
            devices=DEVICES,
            qps=setup.qps,
            burst=setup.burst,
        )
        for i in range(count)
    ]
    with ExitStack() as stack:
        for agent in agents:
            cluster.create_node(agent.node, pods=10)
            stack.callback(cluster.delete_node, agent.node)
            stack.callback(agent.stop)
        progress(f"{count} x {side}: starting ...")
        before, open_before = server.snapshot()
        started = time.monotonic()
        for agent in agents:
            spawn(agent, setup.kubeconfig)
        wait_started(cluster, agents, timeout=120 + 3 * count)
        start_seconds = time.monotonic() - started
        start_cpu = [cpu_seconds(a.pid) * 1000 for a in agents]
        rest_from = [running_ms(a.pid) for a in agents]
        rss = [rss_mib(a.pid) for a in agents]
        mid, open_mid = server.snapshot()
        conns_started = [connections(a.pid, setup.port) for a in agents]
        progress(f"{count} x {side}: at rest for {idle:g} s ...")
        time.sleep(idle)
        rest_to = [running_ms(a.pid) for a in agents]
        after, _ = server.snapshot()
        conns_idle = [connections(a.pid, setup.port) for a in agents]
        for agent in agents:
            if agent.proc is not None:
                stop_process(agent.proc, what=f"{side} on {agent.node}")
                agent.proc = None
    watches = open_mid.copy()
    watches.subtract(open_before)
    per_minute = count * idle / 60.0
    return Measurement(
        side=side,
        agents=count,
        start_seconds=start_seconds,
        start_requests=describe(server.agents_share(mid, before), count),
        idle_requests_per_minute=describe(server.agents_share(after, mid), per_minute),
        watches_open=sum(n for (verb, _), n in watches.items() if verb == "WATCH") / count,
        connections_started=conns_started,
        connections_idle=conns_idle,
        start_cpu_ms=start_cpu,
        idle_cpu_ms_per_minute=[
            (b - a) * 60 / idle for a, b in zip(rest_from, rest_to, strict=True)
        ],
        rss_mib=rss,
    )


# ---------------------------------------------------------------------------- the run


@dataclass
class Setup:
    kubeconfig: str
    port: int
    cluster: Cluster
    server: ApiServer
    root: Path
    go: Path
    qps: float
    burst: int


def bare_api_server(stack: ExitStack, progress: Callable[[str], None]) -> str:
    """The test control plane without scheduler and controller-manager (stopped with ``stack``):
    nothing but the agents and this benchmark sends requests (the controller-manager would
    read the API's discovery documents every few seconds)."""
    from dra_core.testing.controlplane import ControlPlane, find_binaries

    progress("starting the test API server ...")
    cp = ControlPlane(binaries=find_binaries(), scheduler=False, controller_manager=False)
    stack.enter_context(cp)
    return str(cp.kubeconfig_path)


def table(rows: Iterable[dict[str, Any]]) -> str:
    columns = [
        ("side", "agent"),
        ("agents", "N"),
        ("start_requests_per_node", "start req/node"),
        ("idle_requests_per_node_per_min", "rest req/node/min"),
        ("watches_per_node", "watches/node"),
        ("connections_started_max", "conns started (max)"),
        ("connections_idle_max", "conns at rest (max)"),
        ("start_cpu_ms_median", "start CPU ms (median)"),
        ("idle_cpu_ms_per_min_median", "rest CPU ms/min (median)"),
        ("start_s", "all started (s)"),
    ]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--agents", default="1,10,30", help="numbers of agents, comma-separated (1,10,30)"
    )
    parser.add_argument("--idle", type=float, default=60.0, help="seconds at rest (60)")
    parser.add_argument(
        "--background",
        type=float,
        default=15.0,
        help="seconds to learn the control plane's own requests (15)",
    )
    parser.add_argument(
        "--sides", default=f"{DRA_CORE},{GOREF}", help=f"agents to run ({DRA_CORE},{GOREF})"
    )
    parser.add_argument("--qps", type=float, default=5.0, help="the Go agent's client-go QPS (5)")
    parser.add_argument("--burst", type=int, default=10, help="the Go agent's client-go burst (10)")
    add_cluster_options(parser)
    args = parser.parse_args(argv)
    args.agents = [int(n) for n in args.agents.split(",") if n.strip()]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if set(args.sides) - {DRA_CORE, GOREF} or not args.agents or min(args.agents) < 1:
        parser.error(f"--agents wants counts >= 1, --sides {DRA_CORE} and/or {GOREF}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    counts, sides = args.agents, args.sides
    warnings_only()

    measurements: list[Measurement] = []
    root = Path(tempfile.mkdtemp(prefix="dra-agents-", dir="/tmp"))  # short socket paths
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        go = build_go() if GOREF in sides else Path()
        compile_bytecode()  # as an install does; else each agent compiles what it imports
        kubeconfig = args.kubeconfig or bare_api_server(stack, progress)
        client = load_client(kubeconfig, timeout=30, qps=0)
        wait_for_api(client)
        host = client.api.configuration.host
        port = urlsplit(host).port or 443
        setup = Setup(
            kubeconfig, port, Cluster(client), ApiServer(client), root, go, args.qps, args.burst
        )
        progress(f"what the control plane sends by itself ({args.background:g} s) ...")
        setup.server.background(args.background)
        for count in counts:
            for side in sides:
                measurements.append(measure(setup, side, count, args.idle, progress))
    rows = [m.row() for m in measurements]
    print(table(rows))
    document = {
        "info": {
            **machine_info(),
            "idle_seconds": args.idle,
            "devices_per_agent": DEVICES,
            "goref_qps_burst": [args.qps, args.burst],
            "left_out": sorted(f"{verb} {resource}" for verb, resource in setup.server.others),
        },
        "rows": rows,
        "details": [vars(m) for m in measurements],
    }
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
