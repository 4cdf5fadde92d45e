"""dra-core side by side with a Go reference driver, in one run, against one API server.

The Go reference (benchmarks/goref) is a kubelet plugin built on
k8s.io/dynamic-resource-allocation (the kubeletplugin and resourceslice helpers) that does per
claim what dra-core's fake backend does: read the claim, write one CDI spec with the official
CDI library, keep a JSON checkpoint written with fsync, publish N plain devices. Both agents
are separate processes (``python -m dra_core run --backend fake`` and ``goref``), each on its
own fake Node of the test control plane, and both are driven by the same kubelet-side
program (benchmarks/goref/kubeletbench, built from the kubelet's own Go clients), round
after round, the two agents taking turns (the order alternates between rounds). Each round
also measures the floor: one API read of the claim plus the file writes alone.

Figures, per agent and round: start -> registration socket answers GetInfo; VmRSS right
then; prepare and unprepare p50/p99 (one claim per call, sequential); PARALLEL prepares in
flight at once (time to the last reply, errors); CPU of the agent per 100 sequential
prepares; checkpoint size with CLAIMS claims prepared. Once per agent at the end: fsyncs per
prepare and per unprepare (``strace -f -c -e trace=fsync,fdatasync`` attached to the agent).

Usage: ``python3 benchmarks/compare.py [--rounds 5] [--claims 100] [--parallel 100]``
(``--json`` prints the JSON on stdout instead of writing benchmarks/results/compare-DATE.json).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loguru import logger
from run import (
    FAKE_AGENT,
    RESOURCE_API,
    Cluster,
    agent_dirs,
    allocate_claims,
    cluster_kubeconfig,
    compile_bytecode,
    git_commit,
    installed_agent,
    percentile,
    rss_mib,
    stop_process,
    wait_for_api,
)

from dra_core import ClaimRef
from dra_core.kube.client import load_client

HERE = Path(__file__).resolve().parent
GOREF_DIR = HERE / "goref"
RESULTS_DIR = HERE / "results"
DRA_CORE = "dra-core"
GOREF = "goref"
FLOOR = "floor"
DRIVERS = {DRA_CORE: "fake.dra-core.dev", GOREF: "goref.dra-core.dev"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A step of the comparison failed; the message says which."""


class StraceError(BenchError):
    """strace could not trace the process (not allowed here, or it died)."""


# ---------------------------------------------------------------------------- Go programs


def build_go(timeout: float = 900.0) -> Path:
    """The directory holding ``goref`` and ``kubeletbench`` (benchmarks/goref/build.sh)."""
    try:
        proc = subprocess.run(
            ["bash", str(GOREF_DIR / "build.sh")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        msg = f"building benchmarks/goref timed out: {exc}"
        raise BenchError(msg) from None
    if proc.returncode != 0:
        msg = f"building benchmarks/goref failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        raise BenchError(msg)
    return Path(proc.stdout.strip().splitlines()[-1])


class KubeletBench:
    """The kubelet-side program: one JSON command per line in, one JSON answer per line out."""

    def __init__(self, binary: Path, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(binary)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            msg = f"kubeletbench exited ({self.proc.poll()}) during {op}"
            raise BenchError(msg)
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            msg = f"kubeletbench {op}: {answer.get('error')}"
            raise BenchError(msg)
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        stop_process(self.proc, None, what="kubeletbench")
        self._log.close()


def claim_list(refs: Sequence[ClaimRef]) -> list[dict[str, str]]:
    return [{"namespace": r.namespace, "name": r.name, "uid": r.uid} for r in refs]


# ---------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process so far (all its threads, dead ones included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def settle(pid: int, window: float = 0.25, idle: float = 0.011, timeout: float = 10.0) -> None:
    """Wait until the process uses at most ``idle`` s of CPU in a ``window`` (start-up done)."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - before <= idle:
            return
        before = now


@dataclass
class Agent:
    """One of the two agents: how to run it, where its files are."""

    name: str
    program: tuple[str, ...]  # goref's binary, or dra-core's ``run --backend fake`` command
    root: Path
    node: str
    devices: int
    qps: float
    burst: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def driver(self) -> str:
        return DRIVERS[self.name]

    @property
    def registration_socket(self) -> Path:
        return self.root / "registry" / f"{self.driver}-reg.sock"

    @property
    def checkpoint(self) -> Path:
        return self.root / "plugins" / self.driver / "checkpoint.json"

    def argv(self, kubeconfig: str) -> list[str]:
        common = ["--kubeconfig", kubeconfig, *agent_dirs(self.root, self.node)]
        if self.name == DRA_CORE:  # reads the rate limit from the environment
            return [*self.program, "--devices", str(self.devices), *common]
        return [
            *self.program,
            "--devices",
            str(self.devices),
            "--kube-api-qps",
            str(self.qps),
            "--kube-api-burst",
            str(self.burst),
            *common,
        ]

    def start(self, kubeconfig: str, bench: KubeletBench) -> tuple[float, float]:
        """Spawn the agent; return (ms until GetInfo answered, VmRSS in MiB right then)."""
        if self.proc is not None:
            msg = f"{self.name} is already running"
            raise BenchError(msg)
        registry = self.root / "registry"
        shutil.rmtree(registry, ignore_errors=True)
        registry.mkdir(parents=True)
        argv = self.argv(kubeconfig)
        with (self.root / "agent.log").open("ab") as log:
            spawned = time.time_ns()
            # Both agents get the same client-side rate limit (dra-core reads it from the env).
            env = dict(
                os.environ, DRA_KUBE_API_QPS=str(self.qps), DRA_KUBE_API_BURST=str(self.burst)
            )
            self.proc = subprocess.Popen(  # cwd: `-m dra_core` imports from there first
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=env,
            )
        try:
            answer = bench.call("wait_getinfo", socket=str(self.registration_socket), timeout_s=60)
        except BenchError as exc:
            msg = f"{self.name} did not register: {exc}; log: {self.log_tail()}"
            raise BenchError(msg) from None
        started_ms = (answer["answered_unix_ns"] - spawned) / 1e6
        return started_ms, rss_mib(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, signal.SIGTERM, 20, self.name)
        self.proc = None

    def log_tail(self) -> str:
        try:
            return (self.root / "agent.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def checkpoint_bytes(self) -> int:
        """Bytes of the checkpoint: every ``checkpoint*`` file in the driver's directory."""
        return sum(
            p.stat().st_size for p in self.checkpoint.parent.glob("checkpoint*") if p.is_file()
        )


# ---------------------------------------------------------------------------- fsync counting


def strace_available() -> str | None:
    """None when strace can be used, else why not."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install -y strace)"
    return None


@contextmanager
def count_fsyncs(pid: int, out: Path) -> Iterator[dict[str, int]]:
    """Attach ``strace -f -c`` to every thread of ``pid``; on exit, the fsync/fdatasync calls."""
    counts: dict[str, int] = {}
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out), "-p", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not _all_traced(pid, tracer.pid):
            if tracer.poll() is not None or time.monotonic() > deadline:
                err = tracer.stderr.read().decode() if tracer.stderr else ""
                msg = f"strace could not attach to {pid}: {err.strip()}"
                raise StraceError(msg)
            time.sleep(0.02)
        yield counts
    finally:
        stop_process(tracer, signal.SIGINT, 20, "strace")
    counts.update(parse_strace_summary(out.read_text() if out.exists() else ""))


def _all_traced(pid: int, tracer: int) -> bool:
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        match = re.search(r"^TracerPid:\s*(\d+)", status, re.MULTILINE)
        if match is None or int(match.group(1)) != tracer:
            return False
    return bool(tasks)


def parse_strace_summary(text: str) -> dict[str, int]:
    """Calls per syscall from a ``strace -c`` summary (the calls column, name last)."""
    counts = {"fsync": 0, "fdatasync": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in counts and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return counts


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FigureSpec:
    key: str
    label: str
    unit: str
    floor: bool = True  # the floor has this figure too


FIGURES = (
    FigureSpec("start_ms", "start → registration socket answers GetInfo", "ms", floor=False),
    FigureSpec("rss_mib", "VmRSS after start", "MiB", floor=False),
    FigureSpec("prepare_p50_ms", "prepare p50, one claim per call", "ms"),
    FigureSpec("prepare_p99_ms", "prepare p99", "ms"),
    FigureSpec("unprepare_p50_ms", "unprepare p50", "ms"),
    FigureSpec("unprepare_p99_ms", "unprepare p99", "ms"),
    FigureSpec("parallel_ms", "{parallel} prepares in parallel: time to last reply", "ms"),
    FigureSpec("parallel_errors", "{parallel} prepares in parallel: errors (all rounds)", ""),
    FigureSpec("cpu_per_100_ms", "CPU per 100 sequential prepares", "ms"),
    FigureSpec("checkpoint_kb", "checkpoint size with {claims} claims prepared", "KB"),
    FigureSpec("fsync_per_prepare", "fsyncs per prepare (measured once)", ""),
    FigureSpec("fsync_per_unprepare", "fsyncs per unprepare (measured once)", ""),
)
SUMMED = {"parallel_errors"}


@dataclass
class Results:
    """Per figure and side (dra-core, goref, floor): the value of every round."""

    rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, side: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.rounds.setdefault(key, {}).setdefault(side, []).append(value)

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for spec in FIGURES:
            sides = self.rounds.get(spec.key, {})
            entry: dict[str, Any] = {"label": self.label(spec), "unit": spec.unit}
            for side in (DRA_CORE, GOREF, FLOOR):
                values = sides.get(side)
                if not values:
                    entry[side] = None
                    continue
                value = sum(values) if spec.key in SUMMED else statistics.median(values)
                entry[side] = {"value": value, "rounds": values}
            entry["ratio"] = ratio(sides.get(DRA_CORE), sides.get(GOREF), spec.key in SUMMED)
            if spec.key in self.notes:
                entry["note"] = self.notes[spec.key]
            out[spec.key] = entry
        return out

    def label(self, spec: FigureSpec) -> str:
        return spec.label.format(
            parallel=self.info.get("parallel", "N"), claims=self.info.get("claims", "N")
        )

    def as_dict(self) -> dict[str, Any]:
        return {"info": self.info, "figures": self.summary()}

    def table(self) -> str:
        rows = [("figure", "dra-core", "Go reference", "ratio", "ratio over rounds", "floor")]
        summary = self.summary()
        for spec in FIGURES:
            entry = summary[spec.key]
            unit = f" ({entry['unit']})" if entry["unit"] else ""
            r = entry["ratio"]
            rows.append(
                (
                    entry["label"] + unit,
                    _fmt(entry[DRA_CORE]),
                    _fmt(entry[GOREF]),
                    f"{r['median']:.2f}x" if r and r.get("median") is not None else "—",
                    f"{r['min']:.2f}-{r['max']:.2f}x" if r and r.get("min") is not None else "—",
                    _fmt(entry[FLOOR]) if spec.floor else "—",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = []
        for i, row in enumerate(rows):
            cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
            lines.append("| " + " | ".join(cells) + " |")
            if i == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def _fmt(side: dict[str, Any] | None) -> str:
    if side is None:
        return "—"
    value = float(side["value"])
    if value == int(value):
        return f"{int(value)}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(
    ours: list[float] | None, theirs: list[float] | None, summed: bool
) -> dict[str, float | None] | None:
    """dra-core / Go: of the medians, and its min and max over the rounds."""
    if not ours or not theirs:
        return None
    if summed:
        total_ours, total_theirs = sum(ours), sum(theirs)
        return {"median": total_ours / total_theirs if total_theirs else None}
    per_round = [a / b for a, b in zip(ours, theirs, strict=False) if b]
    median_theirs = statistics.median(theirs)
    result: dict[str, float | None] = {
        "median": statistics.median(ours) / median_theirs if median_theirs else None
    }
    if len(per_round) > 1:
        result.update(min=min(per_round), max=max(per_round))
    return result


# ---------------------------------------------------------------------------- the run


@dataclass
class Setup:
    kubeconfig: str
    cluster: Cluster
    bench: KubeletBench
    agents: list[Agent]
    seq: dict[str, list[ClaimRef]]
    par: dict[str, list[ClaimRef]]


def wait_published(cluster: Cluster, agent: Agent, timeout: float = 60.0) -> None:
    def done() -> bool:
        slices = cluster.client.get(
            f"{RESOURCE_API}/resourceslices",
            query={"fieldSelector": f"spec.nodeName={agent.node},spec.driver={agent.driver}"},
        )["items"]
        return sum(len(s["spec"].get("devices") or []) for s in slices) >= agent.devices

    cluster.wait(f"{agent.name}'s {agent.devices} devices published", done, timeout)


def prepare_round(setup: Setup, agent: Agent) -> dict[str, float]:
    """One round of one agent: start, sequential, checkpoint, parallel, stop."""
    bench = setup.bench
    seq, par = claim_list(setup.seq[agent.name]), claim_list(setup.par[agent.name])
    started_ms, rss = agent.start(setup.kubeconfig, bench)
    try:
        bench.call("register", agent=agent.name, socket=str(agent.registration_socket))
        settle(agent.pid)
        cpu_before = cpu_seconds(agent.pid)
        prepared = bench.call("prepare", agent=agent.name, mode="sequential", claims=seq)
        cpu = cpu_seconds(agent.pid) - cpu_before
        _check(agent.name, "sequential prepare", prepared)
        checkpoint = agent.checkpoint_bytes()
        unprepared = bench.call("unprepare", agent=agent.name, mode="sequential", claims=seq)
        _check(agent.name, "sequential unprepare", unprepared)
        parallel = bench.call("prepare", agent=agent.name, mode="parallel", claims=par)
        for error in (parallel.get("errors") or [])[:3]:
            logger.error("{} parallel prepare: {}", agent.name, error)
        _check(
            agent.name,
            "unprepare",
            bench.call("unprepare", agent=agent.name, mode="batch", claims=par),
        )
        bench.call("close", agent=agent.name)
    finally:
        agent.stop()
    return {
        "start_ms": started_ms,
        "rss_mib": rss,
        **latency("prepare", prepared["calls_ms"]),
        **latency("unprepare", unprepared["calls_ms"]),
        "parallel_ms": parallel["total_ms"],
        "parallel_errors": len(parallel.get("errors") or []),
        "cpu_per_100_ms": cpu * 1000 / len(seq) * 100,
        "checkpoint_kb": checkpoint / 1000,
    }


def floor_round(
    setup: Setup, refs: Sequence[ClaimRef], par: Sequence[ClaimRef]
) -> dict[str, float]:
    bench = setup.bench
    prepared = bench.call("floor_prepare", mode="sequential", claims=claim_list(refs))
    _check(FLOOR, "sequential prepare", prepared)
    unprepared = bench.call("floor_unprepare", mode="sequential", claims=claim_list(refs))
    _check(FLOOR, "sequential unprepare", unprepared)
    parallel = bench.call("floor_prepare", mode="parallel", claims=claim_list(par))
    bench.call("floor_unprepare", mode="batch", claims=claim_list(par))
    return {
        **latency("prepare", prepared["calls_ms"]),
        **latency("unprepare", unprepared["calls_ms"]),
        "parallel_ms": parallel["total_ms"],
        "parallel_errors": len(parallel.get("errors") or []),
        "cpu_per_100_ms": prepared["cpu_ms"] / len(refs) * 100,
        "checkpoint_kb": prepared["checkpoint_bytes"] / 1000,
    }


def latency(what: str, calls: Sequence[float]) -> dict[str, float]:
    return {f"{what}_p50_ms": percentile(calls, 50), f"{what}_p99_ms": percentile(calls, 99)}


def _check(who: str, what: str, answer: dict[str, Any]) -> None:
    errors = answer.get("errors") or []
    if errors:
        msg = f"{who}: {what}: {len(errors)} errors, first: {errors[0]}"
        raise BenchError(msg)


def fsync_phase(setup: Setup, results: Results, claims: int, root: Path) -> None:
    """fsyncs per prepare and per unprepare of each agent, and of the floor (strace)."""
    why = strace_available()
    if why is not None:
        for key in ("fsync_per_prepare", "fsync_per_unprepare"):
            results.notes[key] = f"not measured: {why}"
        return
    try:
        _trace_fsyncs(setup, results, claims, root)
    except StraceError as exc:
        logger.warning("fsyncs not counted: {}", exc)
        for key in ("fsync_per_prepare", "fsync_per_unprepare"):
            results.notes[key] = f"not measured: {exc}"


def _trace_fsyncs(setup: Setup, results: Results, claims: int, root: Path) -> None:
    bench = setup.bench
    for agent in setup.agents:
        refs = claim_list(setup.seq[agent.name][:claims])
        agent.start(setup.kubeconfig, bench)
        try:
            bench.call("register", agent=agent.name, socket=str(agent.registration_socket))
            settle(agent.pid)
            counts = []
            for op in ("prepare", "unprepare"):
                with count_fsyncs(agent.pid, root / f"strace-{agent.name}-{op}.txt") as seen:
                    answer = bench.call(op, agent=agent.name, mode="sequential", claims=refs)
                _check(agent.name, f"traced {op}", answer)
                counts.append(sum(seen.values()) / len(refs))
            bench.call("close", agent=agent.name)
        finally:
            agent.stop()
        results.add(agent.name, {"fsync_per_prepare": counts[0], "fsync_per_unprepare": counts[1]})
    refs = claim_list(setup.seq[DRA_CORE][:claims])
    counts = []
    for op in ("floor_prepare", "floor_unprepare"):
        with count_fsyncs(bench.pid, root / f"strace-floor-{op}.txt") as seen:
            answer = bench.call(op, mode="sequential", claims=refs)
        _check(FLOOR, f"traced {op}", answer)
        counts.append(sum(seen.values()) / len(refs))
    results.add(FLOOR, {"fsync_per_prepare": counts[0], "fsync_per_unprepare": counts[1]})


def make_setup(
    stack: ExitStack,
    args: argparse.Namespace,
    kubeconfig: str,
    root: Path,
    go: Path,
    dra_core: tuple[str, ...],
) -> Setup:
    client = load_client(kubeconfig, timeout=30)
    wait_for_api(client)
    cluster = Cluster(client)
    bench = KubeletBench(go / "kubeletbench", root / "kubeletbench.log")
    stack.callback(bench.close)
    suffix = uuid.uuid4().hex[:6]
    namespace = f"compare-{suffix}"
    devices = args.claims + args.parallel
    cluster.create_namespace(stack, namespace)
    agents = []
    for name in (DRA_CORE, GOREF):
        agent = Agent(
            name=name,
            program=dra_core if name == DRA_CORE else (str(go / "goref"),),
            root=root / name,
            node=f"compare-{name}-{suffix}",
            devices=devices,
            qps=args.qps,
            burst=args.burst,
        )
        agent.root.mkdir(parents=True)
        agents.append(agent)
        cluster.create_node(agent.node, pods=devices + 10)
        stack.callback(cluster.delete_node, agent.node)
        stack.callback(agent.stop)
        cluster.create_device_class(stack, agent.node, agent.driver)
    seq: dict[str, list[ClaimRef]] = {}
    par: dict[str, list[ClaimRef]] = {}
    started = time.perf_counter()
    for agent in agents:
        agent.start(kubeconfig, bench)  # publishes the devices the claims are allocated from
        try:
            wait_published(cluster, agent)
            names = [f"{agent.name}-seq-{i}" for i in range(args.claims)]
            names += [f"{agent.name}-par-{i}" for i in range(args.parallel)]
            refs = allocate_claims(cluster, namespace, agent.node, agent.node, names)
        finally:
            agent.stop()
        seq[agent.name], par[agent.name] = refs[: args.claims], refs[args.claims :]
    logger.info("claims allocated in {:.1f} s", time.perf_counter() - started)
    bench.call(
        "floor_setup", kubeconfig=kubeconfig, dir=str(root / FLOOR), qps=args.qps, burst=args.burst
    )
    return Setup(kubeconfig, cluster, bench, agents, seq, par)


def run(args: argparse.Namespace, results: Results, progress: Callable[[str], None]) -> None:
    progress("building benchmarks/goref ...")
    go = build_go()
    results.info["goref_binary"] = str(go)
    # The Go programs are built before they are timed; dra-core is installed as the image
    # installs it, or (--from-source) compiled as an install is.
    if args.from_source:
        compile_bytecode()
        dra_core: tuple[str, ...] = FAKE_AGENT
    else:
        progress("installing dra-core as the image does ...")
        dra_core = installed_agent()
    results.info["dra_core_program"] = dra_core[0]
    root = Path(tempfile.mkdtemp(prefix="dra-compare-", dir="/tmp"))  # short socket paths
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        kubeconfig = cluster_kubeconfig(stack, args.kubeconfig, progress)
        progress(f"allocating 2 x {args.claims + args.parallel} claims ...")
        setup = make_setup(stack, args, kubeconfig, root, go, dra_core)
        for n in range(args.rounds):
            order = setup.agents if n % 2 == 0 else setup.agents[::-1]
            for agent in order:
                progress(f"round {n + 1}/{args.rounds}: {agent.name} ...")
                results.add(agent.name, prepare_round(setup, agent))
            progress(f"round {n + 1}/{args.rounds}: floor ...")
            results.add(FLOOR, floor_round(setup, setup.seq[DRA_CORE], setup.par[DRA_CORE]))
        if args.fsync_claims > 0:
            progress("fsyncs (strace) ...")
            fsync_phase(setup, results, min(args.fsync_claims, args.claims), root)
        else:
            for key in ("fsync_per_prepare", "fsync_per_unprepare"):
                results.notes[key] = "not measured: --fsync-claims 0"


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--claims", type=int, default=100, help="sequential claims per round")
    parser.add_argument("--parallel", type=int, default=100, help="prepares in flight at once")
    parser.add_argument(
        "--fsync-claims", type=int, default=20, help="prepares traced for fsyncs (0: skip)"
    )
    parser.add_argument("--qps", type=float, default=1000.0, help="Go client QPS (client-go)")
    parser.add_argument("--burst", type=int, default=1000, help="Go client burst (client-go)")
    parser.add_argument("--kubeconfig", help="use this cluster instead of the test control plane")
    parser.add_argument(
        "--from-source",
        action="store_true",
        help="run dra-core with this interpreter from this checkout instead of installed in a "
        "virtual environment as the image installs it (quicker to set up; its start includes "
        "what the development environment adds)",
    )
    parser.add_argument("--note", help="free text kept in the JSON (info.note)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout")
    parser.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/compare-DATE.json)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.claims < 1 or args.parallel < 1:
        parser.error("--rounds, --claims and --parallel must be at least 1")
    return args


def _go_version() -> str:
    try:
        out = subprocess.run(["go", "version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _measured_code() -> dict[str, Any]:
    """Which dra-core was measured: its directory, and uncommitted changes if in this checkout."""
    import dra_core

    package = Path(dra_core.__file__).resolve().parent
    info: dict[str, Any] = {"dra_core_dir": str(package)}
    if package.parent == HERE.parent:
        try:
            out = subprocess.run(
                ["git", "status", "--porcelain", "--", "dra_core", "backends/fake"],
                capture_output=True,
                text=True,
                check=True,
                cwd=HERE.parent,
            )
            info["uncommitted_changes"] = len(out.stdout.splitlines())
        except (OSError, subprocess.CalledProcessError):
            pass
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="{time:HH:mm:ss} {level} {message}")
    results = Results()
    results.info.update(
        date=time.strftime("%Y-%m-%d"),
        commit=git_commit(),
        cpus=os.cpu_count(),
        machine=platform.machine(),
        python=sys.version.split()[0],
        go=_go_version(),
        rounds=args.rounds,
        claims=args.claims,
        parallel=args.parallel,
        fsync_claims=min(args.fsync_claims, args.claims),
        goref_qps=args.qps,
        goref_burst=args.burst,
        loadavg_before=os.getloadavg(),
        kubernetes="v1.37.2 test control plane" if args.kubeconfig is None else "--kubeconfig",
        **_measured_code(),
    )
    if args.note:
        results.info["note"] = args.note

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    run(args, results, progress)
    results.info["seconds"] = round(time.perf_counter() - started, 1)
    results.info["loadavg_after"] = os.getloadavg()
    document = json.dumps(results.as_dict(), indent=2, ensure_ascii=False) + "\n"
    table_out: TextIO = sys.stderr if args.json else sys.stdout
    print(results.table(), file=table_out)
    if args.json:
        sys.stdout.write(document)
    if args.out is not None or not args.json:
        out = args.out or RESULTS_DIR / f"compare-{results.info['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
