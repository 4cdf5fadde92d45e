"""A real Kubernetes node (containerd with CDI, runc, kubelet) for integration tests.

:class:`Node` runs containerd and a kubelet against a started :class:`ControlPlane`, with
everything under one temporary directory and free loopback ports, so pods really run: the
kubelet calls a DRA driver's sockets, containerd injects the driver's CDI devices, and a test
reads what the container saw from its log. Binaries come from ``node-build.sh`` beside this
module (``DRA_TEST_NODE_BINARIES`` for prebuilt ones, else a cached build); the pause and test
images are built from them locally (no registry is needed).

It needs root, as a kubelet does. Stopping leaves the host as it was found: the processes it
started and its containers are gone (another node's are left running), and it undoes what
containerd and the kubelet change outside the temporary directory (mounts, cgroups, network
links, the kernel settings the kubelet tunes, and directories they create at fixed paths).

Usage::

    with ControlPlane() as cp, Node(cp) as node:
        # run the DRA driver with node.registration_dir, node.plugins_dir, node.cdi_dir
        ...

Pods run with ``hostNetwork: true`` (by default the node has no pod network, so that it puts
no bridge or address on the host), the test image :data:`TEST_IMAGE` (busybox: ``sh``, ``ls``,
``stat``, ``env``...) and ``imagePullPolicy: Never``. :meth:`Node.container_log` reads what a
container printed from the kubelet's log files (the API server cannot reach a kubelet whose
only address is loopback). The node is schedulable once :meth:`Node.start` returns
(it lifts the ``node.kubernetes.io/not-ready`` taint the API server puts on new Nodes, as the
node lifecycle controller does once the node is Ready).

A node given a :class:`PodNetwork` runs pods in network namespaces of their own, on a bridge
of the host; they reach the host, and only the host, at the network's gateway, where the
control plane then listens::

    with PodNetwork() as net, ControlPlane(bind_address=net.gateway) as cp:
        with Node(cp, pod_network=net) as node:
            ...  # pods reach the API server at net.gateway; the host reaches them at their IPs
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from dra_core.testing.controlplane import (
    ControlPlane,
    ControlPlaneError,
    _Component,
    free_port,
    run_build_script,
)
from dra_core.testing.images import busybox_image, pause_image, write_oci_archive

__all__ = (
    "PAUSE_IMAGE",
    "TEST_IMAGE",
    "HostState",
    "Node",
    "NodeError",
    "PodNetwork",
    "find_node_binaries",
)

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "node-build.sh"
PAUSE_IMAGE = "dra-core.test/pause:1"
TEST_IMAGE = "dra-core.test/busybox:1"

#: Kernel settings the kubelet tunes on start (pkg/kubelet/cm: setupKernelTunables).
_KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
#: Fixed paths the kubelet and containerd create whatever their flags say.
_FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/run/netns",
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni",
    "/var/lib/cni",
    "/usr/libexec/kubernetes",
)
_CGROUP_ROOT = Path("/sys/fs/cgroup")


class NodeError(ControlPlaneError):
    """The node could not be provided, failed to start, or did not become Ready."""


def find_node_binaries(
    progress: Callable[[str], None] | None = None, version: str | None = None
) -> Path:
    """The directory holding the node's binaries (see ``node-build.sh``) with the kubelet of
    Kubernetes ``version`` (default: ``DRA_K8S_VERSION``, else the default release); build
    progress goes to ``progress`` (default: stderr)."""
    return run_build_script(BUILD_SCRIPT, progress=progress, version=version)


def _mount_points() -> list[str]:
    with Path("/proc/self/mountinfo").open() as f:
        return [line.split()[4] for line in f]


def _links() -> set[str]:
    return {link.name for link in Path("/sys/class/net").iterdir()}


def _of_another_pod_network(link: str, own_bridge: str | None) -> bool:
    """Whether ``link`` is the bridge of another :class:`PodNetwork` than ``own_bridge`` or a
    pod's veth on one: left to its owner, which may be a test run beside this one."""
    master = Path("/sys/class/net", link, "master")
    bridge = master.resolve().name if master.exists() else link
    return bridge.startswith(PodNetwork.BRIDGE_PREFIX) and bridge != own_bridge


def _cgroup_dirs() -> set[Path]:
    if not _CGROUP_ROOT.is_dir():
        return set()
    return {
        d
        for hierarchy in _CGROUP_ROOT.iterdir()
        if hierarchy.is_dir()
        for d in hierarchy.iterdir()
        if d.is_dir()
    }


def _remove_cgroups(top: Path, ours: Collection[str], deadline: float) -> None:
    """Remove the empty cgroups under ``top`` (and ``top``), deepest first, waiting for the
    cgroups of ``ours`` (container IDs) to empty: another node's may stay in use."""
    for cgroup in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        _rmdir(cgroup, deadline if cgroup.name in ours else 0)
    _rmdir(top, 0)


def _rmdir(directory: Path, deadline: float) -> None:
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


class HostState:
    """What the node changes outside its own directory, recorded before it starts so that
    :meth:`restore` can undo it: mounts, cgroups, network links, kernel settings, paths."""

    def __init__(self) -> None:
        self.mounts = set(_mount_points())
        self.links = _links()
        self.cgroups = _cgroup_dirs()
        self.paths = {p for p in _FIXED_PATHS if os.path.lexists(p)}
        self.sysctls: dict[str, str] = {}
        for key in _KUBELET_SYSCTLS:
            with contextlib.suppress(OSError):
                self.sysctls[key] = Path("/proc/sys", key).read_text().strip()

    @staticmethod
    def kill_processes(marker: str) -> None:
        """SIGKILL the processes whose command line names ``marker`` (the node's directory:
        containerd shims, the kubelet, containerd)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def restore(
        self, workdir: Path, containers: Collection[str] = (), bridge: str | None = None
    ) -> list[str]:
        """Undo the changes; return what could not be undone (empty when all is clean).

        Mounts go that are new under ``workdir`` (the node's directory) or under the fixed
        paths the node created; ``containers`` are the IDs of its containers, whose cgroups
        must go; pods' veths on ``bridge`` (the node's pod network) go. What another node
        running beside it made is left alone."""
        problems: list[str] = []
        ours = (str(workdir), *(p for p in _FIXED_PATHS if p not in self.paths))
        new_mounts = [
            m
            for m in _mount_points()
            if m not in self.mounts and any(m == p or m.startswith(p + "/") for p in ours)
        ]
        for mount in sorted(set(new_mounts), key=lambda m: -m.count("/")):
            proc = subprocess.run(["umount", "-l", mount], capture_output=True, text=True)
            if proc.returncode != 0 and mount in _mount_points():
                problems.append(f"mount {mount}: {proc.stderr.strip()}")
        deadline = time.monotonic() + 10
        for top in _cgroup_dirs() - self.cgroups:
            _remove_cgroups(top, containers, deadline)
        for hierarchy in _CGROUP_ROOT.iterdir() if containers else ():
            problems += [
                f"cgroup {d} still in use" for c in containers for d in hierarchy.glob(f"*/{c}")
            ]
        for link in _links() - self.links:
            if _of_another_pod_network(link, bridge):
                continue
            proc = subprocess.run(["ip", "link", "delete", link], capture_output=True, text=True)
            # A pod's veth goes by itself once its network namespace is unmounted.
            if proc.returncode != 0 and link in _links():
                problems.append(f"network link {link}: {proc.stderr.strip()}")
        for key, value in self.sysctls.items():
            path = Path("/proc/sys", key)
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError as e:
                problems.append(f"sysctl {key}: {e}")
        for fixed in _FIXED_PATHS:
            if fixed not in self.paths and os.path.lexists(fixed):
                shutil.rmtree(fixed, ignore_errors=True)
                if os.path.lexists(fixed):
                    problems.append(f"{fixed} could not be removed")
        return problems


class PodNetwork:
    """A pod network for one test node: a Linux bridge holding :attr:`gateway`, the first
    address of a private /24 that no route of the host overlaps; the CNI ``bridge`` plugin
    puts each pod on it with an address from ``host-local``.

    Pods reach the host, and only the host, at :attr:`gateway`: the bridge is no default
    gateway, nothing is forwarded or masqueraded (``ip_forward`` and iptables are left alone),
    so no pod traffic leaves the machine. The host reaches the pods at their IPs, as the
    kubelet's probes do. It is made before the control plane (which may then listen on the
    gateway) and removed after it; :meth:`remove` deletes the bridge, and the node's pods' veths
    go with their network namespaces."""

    BRIDGE_PREFIX = "dra-pod-"
    #: Subnets are /24s drawn from here at random, so that test runs side by side differ.
    POOL = ipaddress.IPv4Network("10.240.0.0/12")

    def __init__(self) -> None:
        self.bridge = self.BRIDGE_PREFIX + secrets.token_hex(3)  # at most 15 characters
        self.subnet = self._free_subnet()

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def _free_subnet(self) -> ipaddress.IPv4Network:
        routes = subprocess.run(
            ["ip", "-4", "-j", "route", "show", "table", "all"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        taken = [
            ipaddress.IPv4Network(r["dst"], strict=False)
            for r in json.loads(routes)
            if r.get("dst", "default") != "default"
        ]
        subnets = list(self.POOL.subnets(new_prefix=24))
        for _ in range(100):
            subnet = subnets[secrets.randbelow(len(subnets))]
            if not any(subnet.overlaps(t) for t in taken):
                return subnet
        msg = f"no /24 of {self.POOL} is free of the host's routes: remove stale routes there"
        raise NodeError(msg)

    def __enter__(self) -> PodNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def create(self) -> PodNetwork:
        """Create the bridge with the gateway address, up (pods are plugged in as they come)."""
        try:
            address = f"{self.gateway}/{self.subnet.prefixlen}"
            for argv in (
                ["ip", "link", "add", "name", self.bridge, "type", "bridge"],
                ["ip", "addr", "add", address, "dev", self.bridge],
                ["ip", "link", "set", self.bridge, "up"],
            ):
                proc = subprocess.run(argv, capture_output=True, text=True)
                if proc.returncode != 0:
                    msg = f"pod network {self.subnet}: {' '.join(argv)} failed: "
                    raise NodeError(msg + proc.stderr.strip())
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        if self.bridge in _links():
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        if self.bridge in _links():
            msg = f"pod network {self.subnet}: bridge {self.bridge} could not be deleted"
            raise NodeError(msg)

    def cni_config(self, ipam_dir: Path) -> dict[str, Any]:
        """The CNI configuration of the network, with ``host-local``'s state in ``ipam_dir``."""
        return {
            "cniVersion": "1.0.0",
            "name": self.bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    # The gateway is already on the bridge; with isGateway the plugin would
                    # also turn on ip_forward for the whole host.
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                        "dataDir": str(ipam_dir),
                    },
                },
                {"type": "loopback"},
            ],
        }


class Node:
    """containerd + kubelet on 127.0.0.1, registered with ``control_plane`` as ``name``; pods
    run in the host's network unless ``pod_network`` is given."""

    def __init__(
        self,
        control_plane: ControlPlane,
        binaries: Path | None = None,
        *,
        name: str = "dra-test-node",
        feature_gates: Mapping[str, bool] | None = None,
        pod_network: PodNetwork | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.control_plane = control_plane
        self.pod_network = pod_network
        self.binaries = binaries
        self.name = name
        # The kubelet runs the control plane's release and, unless told otherwise, its gates.
        self.feature_gates = dict(feature_gates or control_plane.feature_gates)
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.host: HostState | None = None
        self.components: dict[str, _Component] = {}
        self.kubelet_port = 0

    # ------------------------------------------------------------------ paths
    def _path(self, *parts: str) -> Path:
        if self.workdir is None:
            msg = f"node {self.name} is not started"
            raise NodeError(msg)
        return self.workdir.joinpath(*parts)

    @property
    def root_dir(self) -> Path:
        """The kubelet's ``--root-dir``."""
        return self._path("kubelet")

    @property
    def registration_dir(self) -> Path:
        """Where DRA drivers put their registration socket (``plugins_registry``)."""
        return self._path("kubelet", "plugins_registry")

    @property
    def plugins_dir(self) -> Path:
        """Parent of each DRA driver's socket directory (``plugins``)."""
        return self._path("kubelet", "plugins")

    @property
    def cdi_dir(self) -> Path:
        """The CDI spec directory containerd reads."""
        return self._path("cdi")

    @property
    def containerd_socket(self) -> Path:
        return self._path("containerd", "containerd.sock")

    @property
    def pod_logs_dir(self) -> Path:
        return self._path("pods")

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """What the container printed (stdout and stderr, all its runs), from the kubelet's
        CRI log files; empty before it has started."""
        lines = []
        for path in sorted(self.pod_logs_dir.glob(f"{namespace}_{pod}_*/{container}/*.log")):
            for line in path.read_text(errors="replace").splitlines():
                # CRI format: <time> <stream> <P|F> <text>; P lines continue on the next.
                parts = line.split(" ", 3)
                if len(parts) == 4:
                    lines.append(parts[3] + ("\n" if parts[2] == "F" else ""))
        return "".join(lines)

    def log_path(self, component: str) -> Path:
        return self.components[component].log_path

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Node:
        if os.geteuid() != 0:
            raise NodeError("a test node needs root (containerd and the kubelet run as root)")
        if self.control_plane.kubeconfig_path is None:
            raise NodeError("start the control plane before the node")
        if self.binaries is None:
            self.binaries = find_node_binaries(version=self.control_plane.k8s_version)
        self.host = HostState()
        self.workdir = Path(tempfile.mkdtemp(prefix="dra-core-node-"))
        try:
            for sub in (
                "cdi",
                "cni/net.d",
                "containerd",
                "kubelet/plugins_registry",
                "kubelet/plugins",
                "images",
            ):
                self._path(sub).mkdir(parents=True, exist_ok=True)
            self._start_containerd()
            self._import_images()
            self.start_kubelet()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the kubelet, containers and containerd; restore the host; remove the files.

        Raises :class:`NodeError` naming what could not be undone."""
        self.stop_kubelet()
        containers = self._remove_containers()
        comp = self.components.pop("containerd", None)
        if comp is not None:
            comp.stop(grace=10)
        problems: list[str] = []
        if self.host is not None and self.workdir is not None:
            self.host.kill_processes(str(self.workdir))
            bridge = self.pod_network.bridge if self.pod_network else None
            problems = self.host.restore(self.workdir, containers, bridge)
            self.host = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if problems:
            raise NodeError(f"node {self.name} left the host changed: " + "; ".join(problems))

    def _remove_containers(self) -> list[str]:
        """Kill and delete every container of this node with runc, which also removes its
        cgroup; return their IDs."""
        if self.workdir is None or self.binaries is None:
            return []
        root = self._path("runc", "k8s.io")
        containers = [d.name for d in root.iterdir()] if root.is_dir() else []
        for container in containers:
            subprocess.run(
                [str(self.binaries / "runc"), "--root", str(root), "delete", "--force", container],
                capture_output=True,
                timeout=30,
            )
        return containers

    def _component(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> _Component:
        comp = _Component(name, argv, self._path(f"{name}.log"), env=env)
        self.components[name] = comp
        comp.start()
        return comp

    # ------------------------------------------------------------------ containerd
    def _containerd_config(self) -> str:
        assert self.binaries is not None
        wd = self._path()
        cri = "plugins.'io.containerd.cri.v1.runtime'"
        runc = f"{cri}.containerd.runtimes.runc"
        return f"""version = 3
root = "{wd}/containerd/root"
state = "{wd}/containerd/state"
temp = "{wd}/containerd/tmp"

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.containerd_socket}.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{wd}/containerd/opt"

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[{cri}]
  enable_cdi = true
  cdi_spec_dirs = ["{self.cdi_dir}"]
  # Without CAP_SYS_RESOURCE runc cannot lower the sandbox's oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true

[{cri}.cni]
  bin_dirs = ["{self.binaries}/cni"]
  conf_dir = "{wd}/cni/net.d"

[{cri}.containerd]
  default_runtime_name = "runc"

[{runc}]
  runtime_type = "io.containerd.runc.v2"

[{runc}.options]
  BinaryName = "{self.binaries}/runc"
  Root = "{wd}/runc"
  SystemdCgroup = false
"""

    def _start_containerd(self) -> None:
        assert self.binaries is not None
        config = self._path("containerd", "config.toml")
        config.write_text(self._containerd_config())
        # The runtime reports the network ready with any valid configuration. Without a pod
        # network this one gives pods no address, so only ``hostNetwork`` pods start, and the
        # node never puts a bridge or an address on the host.
        if self.pod_network is not None:
            cni = self.pod_network.cni_config(self._path("cni", "ipam"))
        else:
            cni = {
                "cniVersion": "1.0.0",
                "name": "dra-core-test",
                "plugins": [{"type": "loopback"}],
            }
        self._path("cni", "net.d", "10-pods.conflist").write_text(json.dumps(cni))
        env = dict(os.environ, PATH=f"{self.binaries}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        comp = self._component(
            "containerd", [str(self.binaries / "containerd"), "--config", str(config)], env=env
        )

        def ready() -> tuple[bool, str]:
            proc = self._ctr("version", check=False)
            return proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-200:]

        comp.wait_until(ready, "serving", self.start_timeout, NodeError)

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.binaries is not None
        argv = [
            str(self.binaries / "ctr"),
            "--address",
            str(self.containerd_socket),
            "--namespace",
            "k8s.io",
            *args,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            msg = f"node {self.name}: {' '.join(argv)} failed: {proc.stderr.strip()}"
            raise NodeError(msg)
        return proc

    def _import_images(self) -> None:
        assert self.binaries is not None
        for image in (
            pause_image(self.binaries / "pause", PAUSE_IMAGE),
            busybox_image(self.binaries / "busybox", TEST_IMAGE),
        ):
            archive = self._path("images", image.name.replace("/", "_") + ".tar")
            write_oci_archive(image, archive)
            self.import_image(archive)

    def import_image(self, archive: Path) -> None:
        """Load an OCI image archive into the node's containerd (as ``kind load`` does)."""
        self._ctr("images", "import", "--platform", "linux/amd64", str(archive))

    # ------------------------------------------------------------------ kubelet
    def _kubelet_config(self) -> dict[str, Any]:
        self.kubelet_port = free_port()
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "featureGates": self.feature_gates,
            "podLogsDir": str(self.pod_logs_dir),
            "volumePluginDir": str(self._path("volume-plugins")),
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "resolvConf": "",
            "serializeImagePulls": False,
        }

    def start_kubelet(self) -> None:
        """Start (or start again) the kubelet, and wait until the node is Ready."""
        assert self.binaries is not None and self.control_plane.kubeconfig_path is not None
        config = self._path("kubelet.yaml")
        if not config.exists():
            config.write_text(json.dumps(self._kubelet_config(), indent=2))
        started = time.time()
        comp = self._component(
            "kubelet",
            [
                str(self.binaries / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={self.control_plane.kubeconfig_path}",
                f"--root-dir={self.root_dir}",
                f"--cert-dir={self._path('kubelet-pki')}",
                f"--hostname-override={self.name}",
                "--node-ip=127.0.0.1",
                "--v=2",
            ],
        )
        comp.wait_until(
            lambda: self._ready_since(started),
            f"Ready as node {self.name}",
            self.start_timeout,
            NodeError,
        )
        self._untaint_not_ready()

    def stop_kubelet(self) -> None:
        """Stop the kubelet (its pods keep running, as on a real node)."""
        comp = self.components.pop("kubelet", None)
        if comp is not None:
            comp.stop(grace=10)

    def restart_kubelet(self) -> None:
        self.stop_kubelet()
        self.start_kubelet()

    def _api(self, method: str, path: str, body: Any = None, content_type: str = "") -> Any:
        cp = self.control_plane
        assert cp.server is not None and cp.ca_path is not None
        request = urllib.request.Request(
            f"{cp.server}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {cp.token}", "Content-Type": content_type},
        )
        context = ssl.create_default_context(cafile=str(cp.ca_path))
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return json.loads(response.read())

    def _ready_since(self, started: float) -> tuple[bool, str]:
        node = self._api("GET", f"/api/v1/nodes/{self.name}")
        for cond in node.get("status", {}).get("conditions", []):
            if cond["type"] == "Ready":
                heartbeat = cond.get("lastHeartbeatTime", "")
                fresh = _parse_time(heartbeat) >= started - 1
                ok = cond["status"] == "True" and fresh
                return ok, f"Ready={cond['status']} ({cond.get('message', '')}) at {heartbeat}"
        return False, "no Ready condition yet"

    def _untaint_not_ready(self) -> None:
        node = self._api("GET", f"/api/v1/nodes/{self.name}")
        taints = node.get("spec", {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != "node.kubernetes.io/not-ready"]
        if kept != taints:
            self._api(
                "PATCH",
                f"/api/v1/nodes/{self.name}",
                {"spec": {"taints": kept}},
                content_type="application/merge-patch+json",
            )


def _parse_time(value: str) -> float:
    """Seconds since the epoch of an API timestamp (``2026-01-02T03:04:05Z``); 0 if empty."""
    return datetime.fromisoformat(value).timestamp() if value else 0.0
