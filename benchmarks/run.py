"""dra-core's performance benchmark: the figures of DESIGN.md, "Performance goals".

Measures, on this machine, against a real API server and scheduler (the test control plane):

1. start to registered: ``dra-core run --backend fake --no-publish`` as a subprocess, from spawn
   until its registration socket answers GetInfo; median of several starts; then its VmRSS.
2. discovery: the i915 backend's ``discover`` over a fake sysfs of GPUS Max 1100 PFs with VFS
   SR-IOV VFs each; median and max of 20 runs, and the device count.
3. publishing those devices: a SlicePublisher from start until every slice is accepted
   (``wait_synced``), then the API writes during a quiet period (must be 0).
4. prepare latency: CLAIMS one-device claims allocated by the scheduler, prepared one per
   kubelet call, sequentially, through the agent's real sockets; p50/p99 (and unprepare).
5. claims in flight: CLAIMS more claims prepared by CLAIMS concurrent kubelet calls; errors,
   total time, claims/s.
6. cost in the number of claims held: the CLAIMS claims of 4 prepared and unprepared one at a
   time with no other claim prepared, then again with HELD claims prepared; p50/p99 of each,
   and the fsyncs (and fdatasyncs) the agent made per prepare and per unprepare.

Usage: ``python benchmarks/run.py [--claims 100] [--gpus 8] [--vfs 63] [--json out.json]``.
``--kubeconfig`` uses a running cluster (with kube-scheduler) instead of starting the test
control plane. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from dra_core import BackendIdentity, ClaimRef, Device, Inventory, hookimpl
from dra_core.hookspecs import NodeContext
from dra_core.kube.client import ApiError, KubeClient, load_client
from dra_core.plugins import Hooks, PluginLoadError, from_objects, load
from dra_core.runtime import Agent, AgentSettings
from dra_core.slices.publisher import PublisherSettings, SlicePublisher
from dra_core.testing import scenario
from dra_core.testing.kubelet import FakeKubelet

RESOURCE_API = scenario.RESOURCE_API
I915_DRIVER = "gpu.intel.com"
MAX_1100 = "0x0bd9"  # Intel Data Center GPU Max 1100: profile max_48g_c63 splits it in 63 VFs
GIB = 1 << 30


# ---------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One reported figure."""

    key: str
    label: str
    value: float | int
    unit: str
    goal: str = ""


@dataclass
class Report:
    """Every figure, in the order measured, plus what the run was."""

    figures: list[Figure] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, label: str, value: float | int, unit: str, goal: str = "") -> None:
        self.figures.append(Figure(key, label, value, unit, goal))

    def as_dict(self) -> dict[str, Any]:
        return {"info": self.info, "figures": {f.key: f.value for f in self.figures}}

    def table(self) -> str:
        rows = [("figure", "value", "goal")]
        for f in self.figures:
            value = f"{f.value:.2f}" if isinstance(f.value, float) else str(f.value)
            rows.append((f.label, f"{value} {f.unit}".strip(), f.goal))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)


#: Every figure key a complete run reports (the smoke test checks them).
FIGURE_KEYS = (
    "start_to_registered_ms_median",
    "start_to_registered_ms_max",
    "agent_rss_mib",
    "discovery_devices",
    "discovery_ms_median",
    "discovery_ms_max",
    "publish_devices",
    "publish_slices",
    "publish_ms",
    "publish_quiet_writes",
    "publish_quiet_syncs",
    "prepare_claims",
    "prepare_ms_p50",
    "prepare_ms_p99",
    "unprepare_ms_p50",
    "unprepare_ms_p99",
    "concurrent_claims",
    "concurrent_errors",
    "concurrent_seconds",
    "concurrent_claims_per_s",
    "concurrent_call_ms_p50",
    "concurrent_call_ms_p99",
    "held_claims",
    "prepare_held0_ms_p50",
    "prepare_held0_ms_p99",
    "unprepare_held0_ms_p50",
    "unprepare_held0_ms_p99",
    "prepare_heldn_ms_p50",
    "prepare_heldn_ms_p99",
    "unprepare_heldn_ms_p50",
    "unprepare_heldn_ms_p99",
    "prepare_held_ratio_p50",
    "fsyncs_per_prepare",
    "fsyncs_per_unprepare",
)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ---------------------------------------------------------------------------- 1. start


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    msg = f"no VmRSS in /proc/{pid}/status"
    raise RuntimeError(msg)


def stop_process(
    proc: subprocess.Popen[Any],
    sig: int | None = signal.SIGTERM,
    timeout: float = 10.0,
    what: str = "",
) -> None:
    """Send ``sig`` (None: none, the process ends by itself) and wait; kill it after ``timeout``."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning(
            "{} did not exit within {} s; killing it", what or f"pid {proc.pid}", timeout
        )
        proc.kill()
        proc.wait(10)


def _registered(registration_dir: Path) -> bool:
    for sock in registration_dir.glob("*.sock"):
        try:
            with FakeKubelet(sock) as kubelet:
                kubelet.get_info(timeout=0.5)
            return True
        except Exception:  # noqa: BLE001 - not serving yet
            return False
    return False


#: ``dra-core run`` with the fake backend, before the options of one agent.
FAKE_AGENT = (sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--http-port", "0")


def agent_dirs(root: Path, node: str) -> list[str]:
    """The node and directory options of an agent rooted at ``root`` (dra-core's or goref's)."""
    return [
        "--node-name",
        node,
        "--registration-dir",
        str(root / "registry"),
        "--plugins-dir",
        str(root / "plugins"),
        "--cdi-dir",
        str(root / "cdi"),
    ]


def start_once(root: Path, timeout: float = 30.0) -> tuple[float, float]:
    """Spawn ``dra-core run``; return (seconds until GetInfo answers, VmRSS in MiB)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    registration_dir = root / "registry"
    argv = [*FAKE_AGENT, "--no-publish", *agent_dirs(root, "bench-start")]
    with (root / "agent.log").open("wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            while not _registered(registration_dir):
                if proc.poll() is not None:
                    msg = f"dra-core run exited with {proc.returncode}; see {root / 'agent.log'}"
                    raise RuntimeError(msg)
                if time.perf_counter() - started > timeout:
                    msg = f"dra-core run did not register within {timeout} s"
                    raise RuntimeError(msg)
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
            rss = rss_mib(proc.pid)
        finally:
            stop_process(proc)
    return elapsed, rss


ROOT = Path(__file__).resolve().parents[1]
#: Where the benchmarks keep what they build (the virtual environment of `installed_agent`).
BENCH_CACHE = Path(os.environ.get("DRA_TEST_CACHE") or Path.home() / ".cache/dra-core") / "bench"


def installed_agent() -> tuple[str, ...]:
    """`FAKE_AGENT` as the image installs it (deploy/Dockerfile): the ``dra-core`` script of a
    virtual environment that holds dra-core and the fake backend, built from this checkout,
    and their dependencies only. A development environment adds to every start what an
    installed agent never does (the finders of editable installs, the ``.pth`` files and entry
    points of every other distribution).

    The environment with the dependencies is made once per Python and pyproject files, under
    `BENCH_CACHE` (a minute, from pip's cache or PyPI); the two distributions are built from the
    checkout and installed again at each call (a few seconds). As in the image, the environment
    holds no pip, setuptools or wheel (their entry points would be scanned at every start):
    this interpreter's pip builds the wheels and installs them into it.
    """
    pyprojects = (ROOT / "pyproject.toml", ROOT / "backends" / "fake" / "pyproject.toml")
    digest = hashlib.sha256(sys.version.encode() + b"without pip")
    for path in pyprojects:
        digest.update(path.read_bytes())
    venv = BENCH_CACHE / f"venv-{digest.hexdigest()[:16]}"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        # What the Dockerfile copies, without build leftovers: setuptools builds in the source
        # tree, and a module deleted from the checkout must not be installed from build/.
        source, wheels = Path(tmp) / "src", Path(tmp) / "wheels"
        left_out = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        for tree in ("dra_core", "backends/fake"):
            shutil.copytree(ROOT / tree, source / tree, ignore=left_out)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(ROOT / name, source / name)
        sources = (str(source), str(source / "backends" / "fake"))
        subprocess.run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), *sources],
            check=True,
        )
        built = [str(path) for path in sorted(wheels.glob("*.whl"))]
        install = [*pip, "--python", str(venv / "bin" / "python"), "install"]
        made = venv / ".made"  # written last: a venv cut off while being made is made again
        if not made.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            subprocess.run([*install, *built], check=True)
            made.touch()
        else:
            subprocess.run([*install, "--no-deps", "--force-reinstall", *built], check=True)
    return (str(venv / "bin" / "dra-core"), *FAKE_AGENT[3:])


def compile_bytecode() -> None:
    """Compile dra-core and the fake backend as ``pip install`` does.

    An editable install under ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every
    module from source at each start, which an installed agent never does.
    """
    import compileall

    import dra_backend_fake

    import dra_core

    for package in (dra_core, dra_backend_fake):
        assert package.__file__ is not None  # both are regular packages
        compileall.compile_dir(Path(package.__file__).parent, quiet=1)


def bench_start(report: Report, root: Path, runs: int) -> None:
    compile_bytecode()
    results = [start_once(root / "start") for _ in range(runs)]
    times = [ms(t) for t, _ in results]
    report.add(
        "start_to_registered_ms_median",
        f"start to registered, median of {runs}",
        statistics.median(times),
        "ms",
        "< 1000 ms",
    )
    report.add("start_to_registered_ms_max", "start to registered, max", max(times), "ms")
    report.add("agent_rss_mib", "agent VmRSS after start (max)", max(r for _, r in results), "MiB")


# ---------------------------------------------------------------------------- 2. discovery


def i915_node(root: Path, gpus: int, vfs: int) -> tuple[Hooks, NodeContext]:
    """A fake sysfs of ``gpus`` Max 1100 PFs with ``vfs`` VFs each, and the i915 backend."""
    from dra_backend_i915.profiles import PROFILES
    from dra_backend_i915.testing import FakeSysfs

    profile = f"max_48g_c{vfs}"
    if profile not in PROFILES:
        names = sorted(p for p in PROFILES if p.startswith("max_48g_c"))
        msg = f"no Max 1100 profile with {vfs} VFs; choose --vfs from {names}"
        raise SystemExit(msg)
    fs = FakeSysfs(root / "node")
    for i in range(gpus):
        fs.add_gpu(
            f"0000:{0x10 * (i + 1):02x}:00.0",
            MAX_1100,
            bridge=f"0000:00:{i + 1:02x}.0",
            numa_node=i * 2 // max(gpus, 1),
            lmem_total_bytes=48 * GIB,
            sriov_totalvfs=vfs,
        )
    hooks = load("i915", plugins=False)
    context = NodeContext(
        node_name="bench-i915",
        driver_name=I915_DRIVER,
        options={
            "sysfs-root": str(fs.sys),
            "devfs-root": str(fs.dev),
            "vf-profile": f"max_48g={profile}",
        },
        config={},
        state_dir=root / "i915-state",
    )
    return hooks, context


def bench_discovery(report: Report, hooks: Hooks, context: NodeContext, runs: int) -> Inventory:
    times = []
    inventory = Inventory()
    for _ in range(runs):
        started = time.perf_counter()
        inventory = hooks.discover(context)
        times.append(ms(time.perf_counter() - started))
    report.add("discovery_devices", "discovery: devices found", len(inventory.devices), "")
    report.add(
        "discovery_ms_median",
        f"discovery, median of {runs}",
        statistics.median(times),
        "ms",
        "well under 100 ms",
    )
    report.add("discovery_ms_max", "discovery, max", max(times), "ms")
    return inventory


# ---------------------------------------------------------------------------- cluster access


class Cluster:
    """The few API calls the benchmark makes itself."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.client.request("POST", path, body=body)
        return result

    def delete(self, path: str, query: dict[str, str] | None = None) -> None:
        try:
            self.client.request("DELETE", path, query=query)
        except ApiError as exc:
            if not exc.not_found:
                logger.warning("cleanup: {}", exc)

    def create_node(self, name: str, pods: int) -> None:
        scenario.create_ready_node(self.client, name, cpu="256", memory="1Ti", pods=str(pods))

    def create_namespace(self, stack: ExitStack, name: str) -> None:
        """A namespace, deleted when ``stack`` closes; returns once its ServiceAccount exists."""
        scenario.create_namespace(self.client, name)
        stack.callback(self.delete, f"/api/v1/namespaces/{name}")

    def create_device_class(self, stack: ExitStack, name: str, driver: str) -> None:
        """A DeviceClass of every device of ``driver``, deleted when ``stack`` closes."""
        self.create(f"{RESOURCE_API}/deviceclasses", scenario.device_class_body(name, driver))
        stack.callback(self.delete, f"{RESOURCE_API}/deviceclasses/{name}")

    def delete_node(self, name: str) -> None:
        """The node and the ResourceSlices published for it."""
        self.delete(f"{RESOURCE_API}/resourceslices", {"fieldSelector": f"spec.nodeName={name}"})
        self.delete(f"/api/v1/nodes/{name}")

    def wait(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        scenario.wait_for(what, condition, timeout)


def wait_for_api(client: KubeClient, timeout: float = 60.0) -> None:
    Cluster(client).wait("the API server", lambda: bool(client.get("/api/v1/namespaces")), timeout)


def cluster_kubeconfig(
    stack: ExitStack, kubeconfig: str | None, progress: Callable[[str], None]
) -> str:
    """``kubeconfig``, else the test control plane's, started now and stopped with ``stack``."""
    if kubeconfig is not None:
        return kubeconfig
    from dra_core.testing.controlplane import ControlPlane, find_binaries

    progress("starting the test control plane ...")
    cp = stack.enter_context(ControlPlane(binaries=find_binaries()))
    return str(cp.kubeconfig_path)


# ---------------------------------------------------------------------------- 3. publishing


def bench_publish(
    report: Report, cluster: Cluster, inventory: Inventory, node: str, quiet: float
) -> None:
    cluster.create_node(node, pods=10)
    settings = PublisherSettings(resync_period=1.0)  # full comparisons during the quiet period
    publisher = SlicePublisher(cluster.client, I915_DRIVER, node, settings=settings)
    try:
        started = time.perf_counter()
        publisher.start()
        publisher.update(inventory)
        if not publisher.wait_synced(60):
            msg = "the i915 slices were not accepted within 60 s"
            raise RuntimeError(msg)
        elapsed = time.perf_counter() - started
        slices = cluster.client.get(
            f"{RESOURCE_API}/resourceslices",
            query={"fieldSelector": f"spec.nodeName={node},spec.driver={I915_DRIVER}"},
        )["items"]
        published = sum(len(s["spec"].get("devices") or []) for s in slices)
        writes, syncs = publisher.writes, publisher.syncs
        time.sleep(quiet)
        quiet_writes, quiet_syncs = publisher.writes - writes, publisher.syncs - syncs
    finally:
        publisher.stop()
    report.add("publish_devices", "publish: devices in accepted slices", published, "")
    report.add("publish_slices", "publish: slices", len(slices), "")
    report.add(
        "publish_ms", "publish: start to all slices accepted", ms(elapsed), "ms", "< 1000 ms"
    )
    report.add(
        "publish_quiet_writes",
        f"publish: API writes in {quiet:g} s at steady state",
        quiet_writes,
        "",
        "0",
    )
    report.add("publish_quiet_syncs", "publish: full comparisons in that time", quiet_syncs, "")


# ---------------------------------------------------------------------------- 4, 5. claims


class BenchBackend:
    """Plain devices, trivial prepare: the stand-in when the fake backend is not installed."""

    def __init__(self, devices: int) -> None:
        self.devices = devices

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity("bench.dra-core.dev", "dra-core.dev", "bench")

    @hookimpl
    def dra_discover(self, context: NodeContext) -> Inventory:
        del context
        return Inventory(devices=tuple(Device(f"dev-{i}") for i in range(self.devices)))

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[Any]:
        from dra_core import ContainerEdits, PreparedDevice

        env = {"BENCH_DEVICE": ",".join(d.device for d in claim.devices)}
        return [PreparedDevice(d, ContainerEdits(env=env)) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: Any) -> bool:
        del claim
        return True


def claim_hooks(devices: int) -> tuple[Hooks, dict[str, str], str]:
    """The fake backend with ``devices`` plain devices, else the in-script stand-in."""
    try:
        return load("fake", plugins=False), {"devices": str(devices)}, "fake"
    except PluginLoadError as exc:
        logger.warning("fake backend unavailable ({}); using the in-script backend", exc)
        return from_objects("bench", BenchBackend(devices)), {}, "in-script"


@contextmanager
def claims_agent(
    cluster: Cluster, kubeconfig: str, root: Path, node: str, devices: int, report: Report
) -> Iterator[Agent]:
    hooks, options, name = claim_hooks(devices)
    report.info["claims_backend"] = name
    cluster.create_node(node, pods=devices + 10)
    settings = AgentSettings.below(root, node, poll_interval=5.0, backend_options=options)
    # No client-side rate limit: the figures measure the agent, not the limiter.
    agent = Agent(settings, hooks, client=load_client(kubeconfig, qps=0))
    agent.start()
    try:
        assert agent.publisher is not None
        if not agent.publisher.wait_synced(60):
            msg = "the agent's slices were not accepted within 60 s"
            raise RuntimeError(msg)
        yield agent
    finally:
        agent.stop()


def allocate_claims(
    cluster: Cluster, namespace: str, device_class: str, node: str, names: Sequence[str]
) -> list[ClaimRef]:
    """One-device claims, each used by a pod pinned to ``node``; wait until all are allocated."""
    refs = scenario.create_claims_for_node(cluster.client, namespace, device_class, node, names)
    scenario.wait_for_allocation(cluster.client, namespace, names, timeout=120 + len(names))
    return refs


def bench_sequential(report: Report, kubelet: FakeKubelet, refs: Sequence[ClaimRef]) -> None:
    prepare, unprepare = [], []
    for ref in refs:
        started = time.perf_counter()
        result = kubelet.prepare([ref])[ref.uid]
        prepare.append(ms(time.perf_counter() - started))
        if result.error:
            msg = f"prepare of {ref.name} failed: {result.error}"
            raise RuntimeError(msg)
    for ref in refs:
        started = time.perf_counter()
        error = kubelet.unprepare([ref])[ref.uid]
        unprepare.append(ms(time.perf_counter() - started))
        if error:
            msg = f"unprepare of {ref.name} failed: {error}"
            raise RuntimeError(msg)
    report.add("prepare_claims", "prepare: one-device claims, one per call", len(refs), "")
    report.add("prepare_ms_p50", "prepare latency p50", percentile(prepare, 50), "ms")
    report.add("prepare_ms_p99", "prepare latency p99", percentile(prepare, 99), "ms")
    report.add("unprepare_ms_p50", "unprepare latency p50", percentile(unprepare, 50), "ms")
    report.add("unprepare_ms_p99", "unprepare latency p99", percentile(unprepare, 99), "ms")


def bench_concurrent(report: Report, kubelet: FakeKubelet, refs: Sequence[ClaimRef]) -> None:
    barrier = threading.Barrier(len(refs) + 1)
    calls: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def call(ref: ClaimRef) -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            error = kubelet.prepare([ref])[ref.uid].error
        except Exception as exc:  # noqa: BLE001 - counted and reported
            error = f"{type(exc).__name__}: {exc}"
        with lock:
            calls.append(ms(time.perf_counter() - started))
            if error:
                errors.append(f"{ref.name}: {error}")

    threads = [threading.Thread(target=call, args=(ref,), daemon=True) for ref in refs]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(120)
    elapsed = time.perf_counter() - started
    errors += [f"{len(refs) - len(calls)} calls did not return"] if len(calls) < len(refs) else []
    for error in errors[:5]:
        logger.error("concurrent prepare: {}", error)
    answers = kubelet.unprepare(refs)
    failed = {uid: e for uid, e in answers.items() if e}
    if failed:
        logger.error("unprepare after the concurrent prepare failed: {}", failed)
    report.add("concurrent_claims", "in flight: claims, one concurrent call each", len(refs), "")
    report.add("concurrent_errors", "in flight: errors", len(errors), "", "0")
    report.add("concurrent_seconds", "in flight: total time", elapsed, "s")
    report.add("concurrent_claims_per_s", "in flight: throughput", len(refs) / elapsed, "claims/s")
    report.add("concurrent_call_ms_p50", "in flight: call latency p50", percentile(calls, 50), "ms")
    report.add("concurrent_call_ms_p99", "in flight: call latency p99", percentile(calls, 99), "ms")


class FsyncCounter:
    """Counts the fsync and fdatasync calls of this process (the in-process agent)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        self._saved: list[tuple[str, Callable[[int], None]]] = []

    def __enter__(self) -> FsyncCounter:
        for name in ("fsync", "fdatasync"):
            original = getattr(os, name, None)
            if original is None:
                continue
            self._saved.append((name, original))
            setattr(os, name, self._counting(original))
        return self

    def _counting(self, original: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            with self._lock:
                self.calls += 1
            original(fd)

        return call

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved:
            setattr(os, name, original)


def _in_batches(
    kubelet: FakeKubelet, refs: Sequence[ClaimRef], unprepare: bool, size: int = 50
) -> None:
    for i in range(0, len(refs), size):
        batch = refs[i : i + size]
        if unprepare:
            failed = {u: e for u, e in kubelet.unprepare(batch).items() if e}
        else:
            failed = {u: r.error for u, r in kubelet.prepare(batch).items() if r.error}
        if failed:
            msg = f"{'unprepare' if unprepare else 'prepare'} of held claims failed: {failed}"
            raise RuntimeError(msg)


def bench_held(
    report: Report, kubelet: FakeKubelet, probes: Sequence[ClaimRef], held: Sequence[ClaimRef]
) -> None:
    """Prepare and unprepare each probe claim alone, with none and with ``held`` prepared.

    The two levels alternate over four rounds (none, all, none, all; a quarter of the probes
    each), so that a drift of the machine's load during the run weighs on both alike.
    """
    levels = {"held0": 0, "heldn": len(held)}
    samples: dict[str, tuple[list[float], list[float]]] = {tag: ([], []) for tag in levels}
    syncs = [0, 0]
    rounds = ["held0", "heldn", "held0", "heldn"]
    with FsyncCounter() as fsyncs:
        for index, tag in enumerate(rounds):
            level = levels[tag]
            _in_batches(kubelet, held[:level], unprepare=False)
            prepare, unprepare = samples[tag]
            for ref in probes[index % len(probes) :: len(rounds)]:
                before = fsyncs.calls
                started = time.perf_counter()
                result = kubelet.prepare([ref])[ref.uid]
                prepare.append(ms(time.perf_counter() - started))
                if level == 0:
                    syncs[0] += fsyncs.calls - before
                if result.error:
                    msg = f"prepare of {ref.name} with {level} held failed: {result.error}"
                    raise RuntimeError(msg)
                before = fsyncs.calls
                started = time.perf_counter()
                error = kubelet.unprepare([ref])[ref.uid]
                unprepare.append(ms(time.perf_counter() - started))
                if level == 0:
                    syncs[1] += fsyncs.calls - before
                if error:
                    msg = f"unprepare of {ref.name} with {level} held failed: {error}"
                    raise RuntimeError(msg)
            _in_batches(kubelet, held[:level], unprepare=True)
    for tag, level in levels.items():
        prepare, unprepare = samples[tag]
        at = f"with {level} claims held"
        for q in (50, 99):
            report.add(f"prepare_{tag}_ms_p{q}", f"prepare p{q} {at}", percentile(prepare, q), "ms")
        for q in (50, 99):
            value = percentile(unprepare, q)
            report.add(f"unprepare_{tag}_ms_p{q}", f"unprepare p{q} {at}", value, "ms")
    report.add("held_claims", "claims held for the figures above", len(held), "")
    ratio = percentile(samples["heldn"][0], 50) / percentile(samples["held0"][0], 50)
    report.add(
        "prepare_held_ratio_p50", "prepare p50 with claims held / with none", ratio, "", "<= 1.2"
    )
    measured = len(samples["held0"][0])
    report.add("fsyncs_per_prepare", "fsyncs per prepare", syncs[0] / measured, "")
    report.add("fsyncs_per_unprepare", "fsyncs per unprepare", syncs[1] / measured, "")


def bench_claims(report: Report, kubeconfig: str, root: Path, claims: int, held: int) -> None:
    client = load_client(kubeconfig, timeout=30)
    cluster = Cluster(client)
    suffix = uuid.uuid4().hex[:6]
    node, namespace = f"bench-claims-{suffix}", f"bench-{suffix}"
    with ExitStack() as cleanup:
        cluster.create_namespace(cleanup, namespace)
        cleanup.callback(cluster.delete_node, node)
        agent = cleanup.enter_context(
            claims_agent(cluster, kubeconfig, root / "agent", node, 2 * claims + held, report)
        )
        device_class = f"bench-{suffix}"
        cluster.create_device_class(cleanup, device_class, agent.driver)
        started = time.perf_counter()
        names = [f"seq-{i}" for i in range(claims)] + [f"par-{i}" for i in range(claims)]
        names += [f"held-{i}" for i in range(held)]
        refs = allocate_claims(cluster, namespace, device_class, node, names)
        report.info["allocation_seconds"] = round(time.perf_counter() - started, 2)
        assert agent.plugin is not None
        with FakeKubelet(agent.plugin.registration_socket) as kubelet:
            kubelet.register()
            bench_sequential(report, kubelet, refs[:claims])
            bench_concurrent(report, kubelet, refs[claims : 2 * claims])
            bench_held(report, kubelet, refs[:claims], refs[2 * claims :])


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=100, help="claims per claim benchmark")
    parser.add_argument("--gpus", type=int, default=8, help="fake Max 1100 PFs")
    parser.add_argument("--vfs", type=int, default=63, help="VFs per PF (a max_48g profile)")
    parser.add_argument("--start-runs", type=int, default=5, help="agent starts to time")
    parser.add_argument("--discovery-runs", type=int, default=20, help="discoveries to time")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds of steady state")
    parser.add_argument(
        "--held", type=int, default=500, help="claims held for the cost-in-claims-held figures"
    )
    add_cluster_options(parser)
    return parser.parse_args(argv)


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """``--kubeconfig`` (a running cluster instead of the test control plane) and ``--json``."""
    parser.add_argument("--kubeconfig", help="use this cluster instead of the test control plane")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def warnings_only() -> None:
    """Log only warnings and errors (on stderr): the figures go to stdout."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def progress(text: str) -> None:
    """Say on stderr what the benchmark does now."""
    print(text, file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on: date, commit, CPUs, Python."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings_only()
    report = Report()
    report.info.update(
        machine_info(),
        claims=args.claims,
        gpus=args.gpus,
        vfs=args.vfs,
        held=args.held,
    )
    root = Path(tempfile.mkdtemp(prefix="dra-bench-", dir="/tmp"))  # short socket paths
    try:
        print("1/6 start to registered ...", file=sys.stderr)
        bench_start(report, root, args.start_runs)
        print("2/6 discovery ...", file=sys.stderr)
        hooks, context = i915_node(root, args.gpus, args.vfs)
        hooks.start(context)
        try:
            inventory = bench_discovery(report, hooks, context, args.discovery_runs)
        finally:
            hooks.stop(context)
        with ExitStack() as stack:
            kubeconfig = cluster_kubeconfig(
                stack, args.kubeconfig, lambda text: print(f"    {text}", file=sys.stderr)
            )
            client = load_client(kubeconfig, timeout=30)
            wait_for_api(client)
            print("3/6 publishing ...", file=sys.stderr)
            node = f"bench-i915-{uuid.uuid4().hex[:6]}"
            cluster = Cluster(client)
            try:
                bench_publish(report, cluster, inventory, node, args.quiet)
            finally:
                cluster.delete_node(node)
            print("4/6, 5/6, 6/6 claims ...", file=sys.stderr)
            bench_claims(report, kubeconfig, root, args.claims, args.held)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report.table())
    print(json.dumps(report.info))
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    missing = [k for k in FIGURE_KEYS if k not in {f.key for f in report.figures}]
    if missing:
        print(f"missing figures: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
