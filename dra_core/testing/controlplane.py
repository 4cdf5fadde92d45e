"""A real Kubernetes control plane (etcd, kube-apiserver, optionally kube-scheduler and
kube-controller-manager) on loopback, for integration tests.

Binaries come from ``controlplane-build.sh`` beside this module (which honours
``DRA_TEST_BINARIES`` or builds pinned versions from their Go modules into a cache), see
:func:`find_binaries`. Backend authors can use it for their own integration tests, as
``envtest`` serves Go projects; ``dra-core demo`` runs on it.

Usage::

    cp = ControlPlane(binaries=find_binaries())
    cp.start()
    try:
        api = cp.api_client()
        ...
    finally:
        cp.stop()
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from dra_core import releases
from dra_core.releases import DRA_GATE_DEFAULTS, SUPPORTED_MINORS

#: A readiness check: (ready, what was seen).
Probe = Callable[[], tuple[bool, str]]

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "controlplane-build.sh"
BINARY_NAMES = ("etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager")

#: The Kubernetes release the harness runs unless ``DRA_K8S_VERSION`` names another one (the
#: build scripts read the same variable, and cache each release's binaries apart).
DEFAULT_K8S_VERSION = "v1.37.2"
#: The gates turned on in the ``dra`` gate set (where the release has them): every DRA feature
#: the agent can use. DeviceTaintRules are left to the release's default, as the agent does not
#: write them.
DRA_GATES = (
    "DRAPartitionableDevices",
    "DRAConsumableCapacity",
    "DRADeviceTaints",
    "DRADeviceBindingConditions",
    "DRAPrioritizedList",
    "DRAResourceClaimDeviceStatus",
    "ResourceHealthStatus",
)
#: ``DRA_TEST_GATES`` values: ``dra`` turns on :data:`DRA_GATES` (the default, and on 1.37 the
#: same flags as before releases were selectable); ``default`` sets no gate, as most clusters run.
GATE_SETS = ("dra", "default")
#: The gates of the ``dra`` set on the default release.
DEFAULT_FEATURE_GATES: dict[str, bool] = dict.fromkeys(DRA_GATES, True)
#: The API version serving DeviceTaintRule per minor release: with its gate on and that version
#: off, the scheduler waits for ever on an informer that cannot list (``failed to list
#: *v1alpha3.DeviceTaintRule``) and schedules no pod with a claim.
_DEVICE_TAINT_RULE_API: dict[int, tuple[str, str]] = {
    34: ("DRADeviceTaints", "resource.k8s.io/v1alpha3=true"),
    35: ("DRADeviceTaintRules", "resource.k8s.io/v1alpha3=true"),
    36: ("DRADeviceTaintRules", "resource.k8s.io/v1beta2=true"),
}


def selected_k8s_version() -> str:
    """The release selected by ``DRA_K8S_VERSION`` (e.g. ``v1.34.4``), else the default."""
    return os.environ.get("DRA_K8S_VERSION", "").strip() or DEFAULT_K8S_VERSION


def k8s_minor(version: str) -> int:
    """The minor release of ``version`` (``v1.34.4`` -> 34), which must be one whose binaries
    and gates the harness knows."""
    minor = releases.k8s_minor(version)
    if minor not in SUPPORTED_MINORS:
        oldest, newest = SUPPORTED_MINORS[0], SUPPORTED_MINORS[-1]
        msg = f"Kubernetes {version}: the harness supports 1.{oldest} to 1.{newest}"
        raise ValueError(msg)
    return minor


def selected_gate_set() -> str:
    """The gate set selected by ``DRA_TEST_GATES`` (``dra`` or ``default``), else ``dra``."""
    chosen = os.environ.get("DRA_TEST_GATES", "").strip() or "dra"
    if chosen not in GATE_SETS:
        msg = f"DRA_TEST_GATES={chosen!r}: choose one of {', '.join(GATE_SETS)}"
        raise ValueError(msg)
    return chosen


def release_feature_gates(
    version: str, gates: str = "dra", overrides: Mapping[str, bool] | None = None
) -> dict[str, bool]:
    """The ``--feature-gates`` of ``version`` for the gate set ``gates``, with ``overrides``.

    An override turning off a gate the release does not have is dropped (the feature does not
    exist there); turning one on raises :class:`ValueError` rather than a binary refusing to
    start with a less clear message.
    """
    known = DRA_GATE_DEFAULTS[k8s_minor(version)]
    if gates not in GATE_SETS:
        msg = f"gate set {gates!r}: choose one of {', '.join(GATE_SETS)}"
        raise ValueError(msg)
    chosen = {g: True for g in DRA_GATES if g in known} if gates == "dra" else {}
    for gate, enabled in (overrides or {}).items():
        is_dra_gate = any(gate in release for release in DRA_GATE_DEFAULTS.values())
        if is_dra_gate and gate not in known:
            if enabled:
                msg = f"feature gate {gate} does not exist in Kubernetes {version}"
                raise ValueError(msg)
            continue
        chosen[gate] = enabled
    return chosen


def release_runtime_config(
    version: str, feature_gates: Mapping[str, bool], base: Sequence[str] = ()
) -> list[str]:
    """``base`` plus the API versions the release needs served for ``feature_gates``."""
    config = list(base)
    gate_and_api = _DEVICE_TAINT_RULE_API.get(k8s_minor(version))
    if gate_and_api is not None:
        gate, api = gate_and_api
        if feature_gates.get(gate, False) and api not in config:
            config.append(api)
    return config


DEFAULT_RUNTIME_CONFIG = ("resource.k8s.io/v1=true",)
#: A line of the API server's /metrics: kubernetes_feature_enabled{name="X",stage="BETA"} 1
_FEATURE_ENABLED = re.compile(r'^kubernetes_feature_enabled\{name="([^"]+)"[^}]*\} ([01])$', re.M)
# Controllers needed for DRA tests: ResourceClaimTemplates -> claims, ServiceAccounts + tokens so
# pods can be created in fresh namespaces, namespace deletion, garbage collection of owned claims.
DEFAULT_CONTROLLERS = (
    "resourceclaim-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "device-taint-eviction-controller",
    # The chart's agent DaemonSet on a real test node, with its service-account token volume.
    "daemonset-controller",
    "root-ca-certificate-publisher-controller",
)


class ControlPlaneError(RuntimeError):
    """A component could not be provided, failed to start, or exited."""


class BinariesUnavailable(ControlPlaneError):
    """The control-plane binaries are not available and could not be built."""


def tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(data.splitlines()[-lines:])


def find_binaries(
    build: bool = True,
    timeout: float | None = None,
    progress: Callable[[str], None] | None = None,
    version: str | None = None,
) -> Path:
    """Return the directory holding the four binaries of Kubernetes ``version`` (default:
    :func:`selected_k8s_version`).

    Runs build.sh (which uses ``DRA_TEST_BINARIES`` when set, else a cached or fresh build).
    Raises :class:`BinariesUnavailable` with the script's error output when that fails. With
    ``build=False`` only ``DRA_TEST_BINARIES`` is consulted.
    """
    env_dir = os.environ.get("DRA_TEST_BINARIES")
    if not build:
        if not env_dir:
            raise BinariesUnavailable("DRA_TEST_BINARIES is not set and building is disabled")
        d = Path(env_dir)
        missing = [b for b in BINARY_NAMES if not os.access(d / b, os.X_OK)]
        if missing:
            msg = f"DRA_TEST_BINARIES={d} lacks executable {missing}"
            raise BinariesUnavailable(msg)
        return d
    return run_build_script(BUILD_SCRIPT, timeout, progress, version=version)


def run_build_script(
    script: Path,
    timeout: float | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    version: str | None = None,
) -> Path:
    """Run a build script that prints its bin directory as the last line on stdout.

    Its progress lines (stderr) go to ``progress`` as they come (default: this process's
    stderr), so a long first build shows where it is; a failure raises
    :class:`BinariesUnavailable` with the last lines of it. ``version`` is the Kubernetes
    release to provide (the script's ``DRA_K8S_VERSION``; default: :func:`selected_k8s_version`).
    """
    env = {**os.environ, "DRA_K8S_VERSION": version or selected_k8s_version()}
    report = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    last: collections.deque[str] = collections.deque(maxlen=40)
    try:
        with subprocess.Popen(
            ["bash", str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                for line in proc.stderr:
                    last.append(line.rstrip("\n"))
                    report(last[-1])
                out = [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
                returncode = proc.wait()
            finally:
                if timer:
                    timer.cancel()
    except OSError as e:
        msg = f"{script} could not run: {e}"
        raise BinariesUnavailable(msg) from e
    if returncode != 0:
        detail = "\n".join(last)
        msg = f"{script} failed (exit {returncode}):\n{detail}"
        raise BinariesUnavailable(msg)
    if not out:
        msg = f"{script} printed no bin directory"
        raise BinariesUnavailable(msg)
    return Path(out[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child before exec (Linux only)
    """Ask the kernel to SIGKILL the component when the test process dies (e.g. is killed),
    so no etcd or kube-apiserver outlives a crashed test run."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


class _Component:
    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def check_alive(self) -> None:
        if self.proc is None:
            msg = f"{self.name} was never started"
            raise ControlPlaneError(msg)
        rc = self.proc.poll()
        if rc is not None:
            msg = (
                f"{self.name} exited with code {rc}; last lines of {self.log_path}:\n"
                f"{tail(self.log_path)}"
            )
            raise ControlPlaneError(msg)

    def wait_until(
        self,
        probe: Probe,
        what: str,
        timeout: float,
        error: type[ControlPlaneError] = ControlPlaneError,
    ) -> None:
        """Poll ``probe`` until it says ready; raise ``error`` with the last probe and the log
        tail if the component exits or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        last = "not probed yet"
        while True:
            self.check_alive()
            try:
                ok, last = probe()
            except Exception as e:  # noqa: BLE001 - keep polling, report last error
                ok, last = False, f"{type(e).__name__}: {e}"
            if ok:
                return
            if time.monotonic() > deadline:
                msg = (
                    f"{self.name} not {what} after {timeout:.0f}s (last probe: {last}); "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
                raise error(msg)
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


class ControlPlane:
    """etcd + kube-apiserver (+ kube-scheduler, kube-controller-manager) on 127.0.0.1.

    ``bind_address`` moves the API server alone to another address of the host, e.g. the
    gateway of a test node's :class:`~dra_core.testing.node.PodNetwork`, so that pods reach it;
    its serving certificate names that address, and :attr:`server` and the kubeconfig use it.
    """

    def __init__(
        self,
        binaries: Path | None = None,
        *,
        scheduler: bool = True,
        controller_manager: bool = True,
        k8s_version: str | None = None,
        gates: str | None = None,
        feature_gates: Mapping[str, bool] | None = None,
        runtime_config: Sequence[str] = DEFAULT_RUNTIME_CONFIG,
        controllers: Sequence[str] = DEFAULT_CONTROLLERS,
        extra_apiserver_args: Sequence[str] = (),
        bind_address: str = "127.0.0.1",
        start_timeout: float = 120.0,
        keep_dir_on_failure: bool | None = None,
    ) -> None:
        self.binaries = Path(binaries) if binaries is not None else None
        self.want_scheduler = scheduler
        self.want_controller_manager = controller_manager
        # The release and gate set default to DRA_K8S_VERSION and DRA_TEST_GATES; gates
        # the release does not have are never passed, so its binaries start.
        self.k8s_version = k8s_version or selected_k8s_version()
        self.gates = gates or selected_gate_set()
        self.feature_gates = release_feature_gates(self.k8s_version, self.gates, feature_gates)
        self.runtime_config = release_runtime_config(
            self.k8s_version, self.feature_gates, runtime_config
        )
        self.controllers = list(controllers)
        self.extra_apiserver_args = list(extra_apiserver_args)
        # The API server's only address: loopback, or one that pods of a test node reach
        # (the gateway of its pod network), which its serving certificate then names.
        self.bind_address = bind_address
        self.start_timeout = start_timeout
        if keep_dir_on_failure is None:  # DRA_TEST_KEEP_DIRS=1 keeps logs of a failed start
            keep_dir_on_failure = os.environ.get("DRA_TEST_KEEP_DIRS", "") not in ("", "0", "false")
        self.keep_dir_on_failure = keep_dir_on_failure

        self.workdir: Path | None = None
        self.token = uuid.uuid4().hex
        self.server: str | None = None
        self.kubeconfig_path: Path | None = None
        self.ca_path: Path | None = None
        self.components: dict[str, _Component] = {}
        self._ports: dict[str, int] = {}
        self._atexit_registered = False
        self._enabled_gates: dict[str, bool] | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self.binaries is None:
            self.binaries = find_binaries(version=self.k8s_version)
        for b in BINARY_NAMES:
            if not os.access(self.binaries / b, os.X_OK):
                msg = f"{self.binaries / b} is missing or not executable"
                raise BinariesUnavailable(msg)
        self.workdir = Path(tempfile.mkdtemp(prefix="dra-core-cp-"))
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        t0 = time.monotonic()
        try:
            self._write_credentials()
            self._start_etcd()
            self._start_apiserver()
            if self.want_scheduler:
                self._start_scheduler()
            if self.want_controller_manager:
                self._start_controller_manager()
        except BaseException:
            self.stop(remove_dir=not self.keep_dir_on_failure)
            self.workdir = None  # kept (if at all) for inspection; not ours to delete later
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, remove_dir: bool = True) -> None:
        for name in ("kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd"):
            comp = self.components.pop(name, None)
            if comp is not None:
                comp.stop()
        if remove_dir and self.workdir is not None and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def check_alive(self) -> None:
        """Raise ControlPlaneError (with log tail) if any started component has exited."""
        for comp in self.components.values():
            comp.check_alive()

    def log_path(self, component: str) -> Path:
        return self.components[component].log_path

    # ------------------------------------------------------------------ setup pieces
    def _write_credentials(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        wd = self.workdir
        assert wd is not None
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (wd / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (wd / "sa.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        # token,user,uid,"group1,group2"
        (wd / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        (wd / "tokens.csv").chmod(0o600)
        (wd / "certs").mkdir()

    def _gates_args(self) -> list[str]:
        """``--feature-gates`` of the chosen gates; none at all for the release's defaults."""
        if not self.feature_gates:
            return []
        flag = ",".join(f"{k}={str(v).lower()}" for k, v in sorted(self.feature_gates.items()))
        return [f"--feature-gates={flag}"]

    def _component(self, name: str, argv: list[str]) -> _Component:
        assert self.workdir is not None
        comp = _Component(name, argv, self.workdir / f"{name}.log")
        self.components[name] = comp
        comp.start()
        return comp

    def _wait(
        self, comp: _Component, probe: Probe, what: str, timeout: float | None = None
    ) -> None:
        comp.wait_until(probe, what, timeout or self.start_timeout)

    def _start_etcd(self) -> None:
        wd = self.workdir
        assert wd is not None and self.binaries is not None
        client, peer = free_port(), free_port()
        self._ports["etcd"] = client
        self.etcd_url = f"http://127.0.0.1:{client}"
        comp = self._component(
            "etcd",
            [
                str(self.binaries / "etcd"),
                "--name=default",
                f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
        )

        def probe() -> tuple[bool, str]:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                body = r.read().decode()
            return json.loads(body).get("health") == "true", body

        self._wait(comp, probe, "healthy")

    def _start_apiserver(self) -> None:
        wd = self.workdir
        assert wd is not None and self.binaries is not None
        port = free_port()
        self._ports["kube-apiserver"] = port
        self.server = f"https://{self.bind_address}:{port}"
        argv = [
            str(self.binaries / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--etcd-prefix=/registry",
            f"--cert-dir={wd / 'certs'}",
            # The self-signed serving certificate names the bind address.
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.bind_address}",
            f"--secure-port={port}",
            f"--token-auth-file={wd / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={wd / 'sa.pub'}",
            f"--service-account-signing-key-file={wd / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            *self._gates_args(),
            f"--runtime-config={','.join(self.runtime_config)}",
            "--enable-priority-and-fairness=false",
            "--endpoint-reconciler-type=none",
            "--v=1",
            *self.extra_apiserver_args,
        ]
        comp = self._component("kube-apiserver", argv)

        cert = wd / "certs" / "apiserver.crt"

        def probe() -> tuple[bool, str]:
            if not cert.exists():
                return False, f"{cert} not written yet"
            ctx = ssl.create_default_context(cafile=str(cert))
            req = urllib.request.Request(
                f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    return r.status == 200, r.read().decode()[:200]
            except urllib.error.HTTPError as e:
                return False, f"HTTP {e.code}: {e.read().decode(errors='replace')[-400:]}"

        self._wait(comp, probe, "ready (/readyz)")
        self.ca_path = cert
        self.kubeconfig_path = wd / "admin.kubeconfig"
        self._write_kubeconfig(self.kubeconfig_path)

    def _write_kubeconfig(self, path: Path) -> None:
        assert self.ca_path is not None
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dra-core-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": "admin", "context": {"cluster": "dra-core-test", "user": "admin"}}
            ],
            "current-context": "admin",
        }
        # JSON is valid YAML; no yaml dependency needed.
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)

    def _healthz_probe(self, port: int) -> Probe:
        def probe() -> tuple[bool, str]:
            ctx = ssl._create_unverified_context()  # self-signed in-memory serving cert
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/healthz", timeout=3, context=ctx
            ) as r:
                return r.status == 200, r.read().decode()[:200]

        return probe

    def _start_client_component(self, name: str, *extra: str) -> None:
        """Start kube-scheduler or kube-controller-manager against the API server as admin."""
        assert self.binaries is not None
        port = free_port()
        self._ports[name] = port
        comp = self._component(
            name,
            [
                str(self.binaries / name),
                f"--kubeconfig={self.kubeconfig_path}",
                f"--authentication-kubeconfig={self.kubeconfig_path}",
                f"--authorization-kubeconfig={self.kubeconfig_path}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                *extra,
                *self._gates_args(),
                "--v=2",
            ],
        )
        self._wait(comp, self._healthz_probe(port), "healthy (/healthz)")

    def _start_scheduler(self) -> None:
        self._start_client_component("kube-scheduler")

    def _start_controller_manager(self) -> None:
        assert self.workdir is not None
        self._start_client_component(
            "kube-controller-manager",
            f"--controllers={','.join(self.controllers)}",
            f"--service-account-private-key-file={self.workdir / 'sa.key'}",
            f"--root-ca-file={self.ca_path}",
            "--use-service-account-credentials=false",
        )

    def enabled_gates(self) -> dict[str, bool]:
        """Every feature gate of the running kube-apiserver and whether it is on, as the server
        itself reports them (its ``kubernetes_feature_enabled`` metric), read once."""
        if self._enabled_gates is None:
            if self.server is None:
                raise ControlPlaneError("control plane not started")
            ctx = ssl.create_default_context(cafile=str(self.ca_path))
            request = urllib.request.Request(
                f"{self.server}/metrics", headers={"Authorization": f"Bearer {self.token}"}
            )
            with urllib.request.urlopen(request, timeout=10, context=ctx) as r:
                text = r.read().decode()
            self._enabled_gates = {
                m.group(1): m.group(2) == "1" for m in _FEATURE_ENABLED.finditer(text)
            }
            if not self._enabled_gates:
                msg = f"kube-apiserver at {self.server} reports no kubernetes_feature_enabled"
                raise ControlPlaneError(msg)
        return dict(self._enabled_gates)

    def missing_gates(self, *gates: str) -> list[str]:
        """Which of ``gates`` the running API server has off (or lacks): for a test to skip
        with their names when the release or gate set it runs on does not have a feature."""
        enabled = self.enabled_gates()
        return [g for g in gates if not enabled.get(g, False)]

    # ------------------------------------------------------------------ clients
    def client_configuration(self) -> Any:
        from kubernetes import client

        if self.server is None:
            raise ControlPlaneError("control plane not started")
        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_path)
        cfg.verify_ssl = True
        cfg.api_key = {"authorization": self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return cfg

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` authenticated as a system:masters admin."""
        from kubernetes import client

        return client.ApiClient(self.client_configuration())
