"""``dra-core doctor`` on fixture trees of good and broken set-ups, without a cluster.

The API checks against a real API server are in test_doctor_controlplane.py, and the whole
command against the real test node (kubelet and containerd) in test_doctor_realnode.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from dra_backend_fake import plugin as fake_plugin

from dra_core import DoctorCheck, NodeContext, hookimpl
from dra_core.doctor import (
    DoctorReport,
    DoctorSettings,
    RuntimeInfo,
    Section,
    directory_checks,
    kubelet_version_check,
    query_runtime,
    run_doctor,
    runtime_checks,
)
from dra_core.doctor.cluster import ALL_MODE_OVER_COUNTERS, release_warnings
from dra_core.kubelet.proto import cri_v1_pb2
from dra_core.plugins import from_objects
from dra_core.releases import gates_on
from dra_core.runtime import AgentSettings

FAKE = "fake.dra-core.dev"


def by_name(checks, name: str) -> DoctorCheck:
    matches = [c for c in checks if c.name == name]
    assert len(matches) == 1, [c.name for c in checks]
    return matches[0]


@pytest.fixture
def node_dirs(tmp_path: Path) -> dict[str, Path]:
    """A node's kubelet and CDI directories, as the kubelet and the runtime leave them."""
    dirs = {
        "registration_dir": tmp_path / "kubelet" / "plugins_registry",
        "plugins_dir": tmp_path / "kubelet" / "plugins",
        "cdi_dir": tmp_path / "run" / "cdi",
    }
    for path in dirs.values():
        path.mkdir(parents=True)
    return dirs


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def containerd_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def containerd(version: str) -> RuntimeInfo:
    return RuntimeInfo("containerd", version, "the Node node-1")


def runtime(tmp_path: Path, cdi_dir: Path, node_runtime: RuntimeInfo | None, **paths: Path):
    """The runtime's checks, with a CRI socket that is not there (its warning left out)."""
    checks = runtime_checks(
        socket=tmp_path / "no-such.sock",
        node_runtime=node_runtime,
        containerd_config=paths.get("containerd_config", tmp_path / "no-containerd.toml"),
        crio_config=paths.get("crio_config", tmp_path / "no-crio.conf"),
        cdi_dir=cdi_dir,
    )
    return [c for c in checks if c.name != "CRI socket"]


# ------------------------------------------------------------------------------- settings


def test_the_default_paths_are_the_agents():
    agent = AgentSettings(node_name="n")
    doctor = DoctorSettings(node_name="n")
    assert doctor.registration_dir == agent.registration_dir
    assert doctor.plugins_dir == agent.plugins_dir
    assert doctor.cdi_dir == agent.cdi_dir


def test_a_check_has_one_of_four_statuses():
    with pytest.raises(ValueError, match="status 'error' is not one of ok, warn, fail, skip"):
        DoctorCheck("x", "error", "found")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- directories


def test_kubelet_and_cdi_directories_in_place(node_dirs):
    checks = directory_checks(DoctorSettings(node_name="n", **node_dirs), FAKE)
    assert [c.status for c in checks] == ["ok", "ok", "ok"], checks


def test_missing_plugin_directory_fails_and_says_where_the_kubelet_makes_it(node_dirs):
    node_dirs["plugins_dir"].rmdir()
    checks = directory_checks(DoctorSettings(node_name="n", **node_dirs), FAKE)
    check = by_name(checks, "plugin directory")
    assert check.status == "fail"
    assert check.found == f"{node_dirs['plugins_dir']} does not exist"
    assert "--root-dir" in check.fix and "--plugins-dir (DRA_PLUGINS_DIR)" in check.fix
    assert by_name(checks, "plugin registration directory").status == "ok"


def test_cdi_directory_that_is_a_file_fails(node_dirs):
    node_dirs["cdi_dir"].rmdir()
    node_dirs["cdi_dir"].write_text("")
    check = by_name(
        directory_checks(DoctorSettings(node_name="n", **node_dirs), FAKE), "CDI directory"
    )
    assert (check.status, check.found) == ("fail", f"{node_dirs['cdi_dir']} is not a directory")


def test_cdi_directory_not_made_yet_is_fine_when_its_parent_is_writable(node_dirs):
    node_dirs["cdi_dir"].rmdir()
    check = by_name(
        directory_checks(DoctorSettings(node_name="n", **node_dirs), FAKE), "CDI directory"
    )
    assert check.status == "ok"
    assert "does not exist yet; the agent makes it" in check.found


def doctor_cli(*args: str, read_only: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``dra-core doctor`` as a subprocess; ``read_only`` is bind-mounted read-only for it.

    As root, permissions do not stop writes, so the directory is made read-only the way a pod's
    ``readOnly: true`` volume is: a read-only bind mount, in a mount namespace of the command's
    own (nothing changes for the host). Otherwise its mode is enough.
    """
    argv = [sys.executable, "-m", "dra_core", "doctor", *args]
    env = {
        k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
    }
    if read_only is not None and os.geteuid() == 0:
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(read_only),
            *argv,
        ]
    elif read_only is not None:
        read_only.chmod(0o555)
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env=env, check=False
        )
    finally:
        if read_only is not None:
            read_only.chmod(0o755)


def test_doctor_help_lists_the_backends_options_and_the_runtimes_files():
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "doctor", "--backend", "i915", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--sysfs-root",
        "--cdi-dir",
        "--containerd-config",
        "--runtime-socket",
        "--output",
    ):
        assert flag in result.stdout


def dir_flags(node_dirs: dict[str, Path]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in node_dirs.items()]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("unshare"), reason="needs unshare")
def test_unwritable_cdi_directory_fails_the_command(node_dirs, tmp_path):
    config = containerd_config(tmp_path / "config.toml", "version = 3\n")
    result = doctor_cli(
        "--backend", "fake", "--node-name", "node-1", "--output", "json",
        f"--containerd-config={config}", *dir_flags(node_dirs),
        read_only=node_dirs["cdi_dir"],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for s in report["sections"] for c in s["checks"]}
    cdi = checks["CDI directory"]
    assert cdi["status"] == "fail"
    assert cdi["found"] == f"{node_dirs['cdi_dir']} is not writable, so every prepare fails"
    assert "read-write" in cdi["fix"]
    assert report["ok"] is False
    assert checks["plugin directory"]["status"] == "ok"


def test_good_node_exits_0_with_warnings_and_skips(node_dirs, tmp_path):
    config = containerd_config(
        tmp_path / "config.toml",
        f"version = 2\n[plugins.'io.containerd.grpc.v1.cri']\n  enable_cdi = true\n"
        f"  cdi_spec_dirs = ['{node_dirs['cdi_dir']}']\n",
    )
    result = doctor_cli(
        "--backend", "fake", "--node-name", "node-1", f"--containerd-config={config}",
        *dir_flags(node_dirs),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"dra-core doctor: node node-1, driver {FAKE} (backend fake)\n")
    assert "\n         fix: give the runtime's socket with --runtime-socket" in result.stdout
    text = " ".join(result.stdout.split())  # lines are wrapped at 100 characters
    assert "[skip] API server: no kubeconfig (--kubeconfig, KUBECONFIG)" in text
    assert (
        f"[ok] CDI: enabled: enable_cdi = true in [plugins.'io.containerd.grpc.v1.cri'] of {config}"
        in text
    )
    assert "[warn] container runtime: unknown: no CRI socket answered" in text
    assert "[ok] discovery: 10 devices, 1 counter set; uses partitionable devices" in text
    assert text.endswith("0 failed, 1 warning, 8 ok, 2 skipped: nothing failed")


# ------------------------------------------------------------------------------- runtime


def test_containerd_2_with_cdi_disabled_fails(tmp_path, node_dirs):
    config = containerd_config(
        tmp_path / "config.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n  enable_cdi = false\n",
    )
    checks = runtime(tmp_path, node_dirs["cdi_dir"], containerd("2.1.4"), containerd_config=config)
    assert by_name(checks, "container runtime").found == "containerd 2.1.4 (from the Node node-1)"
    assert by_name(checks, "containerd configuration").found == f"read {config}"
    cdi = by_name(checks, "CDI")
    assert cdi.status == "fail"
    assert cdi.found == (
        "disabled: enable_cdi = false in [plugins.'io.containerd.cri.v1.runtime'] of "
        f"{config}, so no claim's device reaches a container"
    )
    assert cdi.fix.startswith(
        "set enable_cdi = true under [plugins.'io.containerd.cri.v1.runtime']"
    )


def test_containerd_2_4_ignores_enable_cdi(tmp_path, node_dirs):
    config = containerd_config(
        tmp_path / "config.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n  enable_cdi = false\n",
    )
    cdi = by_name(
        runtime(tmp_path, node_dirs["cdi_dir"], containerd("v2.4.2"), containerd_config=config),
        "CDI",
    )
    assert cdi.status == "ok"
    assert "always on in containerd 2.4 and later (enable_cdi = false in" in cdi.found


def test_containerd_1_7_needs_enable_cdi(tmp_path, node_dirs):
    without = containerd_config(tmp_path / "without.toml", "version = 2\n")
    cdi = by_name(
        runtime(tmp_path, node_dirs["cdi_dir"], containerd("1.7.27"), containerd_config=without),
        "CDI",
    )
    assert cdi.status == "fail"
    assert "containerd 1.7 enables CDI only with enable_cdi = true" in cdi.found
    assert '[plugins."io.containerd.grpc.v1.cri"]' in cdi.fix
    with_cdi = containerd_config(
        tmp_path / "with.toml",
        "version = 2\n[plugins.'io.containerd.grpc.v1.cri']\nenable_cdi = true\n",
    )
    cdi = by_name(
        runtime(tmp_path, node_dirs["cdi_dir"], containerd("1.7.27"), containerd_config=with_cdi),
        "CDI",
    )
    assert cdi.status == "ok"


def test_containerd_before_1_7_has_no_cdi(tmp_path, node_dirs):
    checks = runtime(tmp_path, node_dirs["cdi_dir"], containerd("1.6.33"))
    version = by_name(checks, "container runtime")
    assert version.status == "fail"
    assert version.found.endswith("which cannot inject CDI devices")
    assert version.fix == "upgrade containerd to 1.7 or later (2.x turns CDI on by default)"


def test_cdi_spec_directories_without_the_agents_fail(tmp_path, node_dirs):
    config = containerd_config(
        tmp_path / "config.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n  cdi_spec_dirs = ['/etc/cdi']\n",
    )
    dirs = by_name(
        runtime(tmp_path, node_dirs["cdi_dir"], containerd("2.0.0"), containerd_config=config),
        "CDI spec directories",
    )
    assert dirs.status == "fail"
    assert f"not from {node_dirs['cdi_dir']} where the agent writes them" in dirs.found
    assert dirs.fix.startswith(
        f"add {node_dirs['cdi_dir']} to cdi_spec_dirs and restart containerd"
    )


def test_cdi_spec_directory_named_through_a_symlink_counts(tmp_path, node_dirs):
    alias = tmp_path / "var-run"
    alias.symlink_to(node_dirs["cdi_dir"].parent)  # as /var/run is /run
    config = containerd_config(
        tmp_path / "config.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n"
        f"  cdi_spec_dirs = ['{alias}/cdi']\n",
    )
    checks = runtime(tmp_path, node_dirs["cdi_dir"], containerd("2.0.0"), containerd_config=config)
    assert by_name(checks, "CDI spec directories").status == "ok"


def test_containerd_drop_ins_named_by_imports_are_merged(tmp_path, node_dirs):
    config = containerd_config(
        tmp_path / "config.toml",
        "version = 3\nimports = ['conf.d/*.toml']\n"
        "[plugins.'io.containerd.cri.v1.runtime']\n"
        "  enable_cdi = true\n  cdi_spec_dirs = ['/etc/cdi']\n",
    )
    containerd_config(
        tmp_path / "conf.d" / "50-cdi.toml",
        "[plugins.'io.containerd.cri.v1.runtime']\n  enable_cdi = false\n",
    )
    checks = runtime(tmp_path, node_dirs["cdi_dir"], containerd("2.2.0"), containerd_config=config)
    assert by_name(checks, "containerd configuration").found == (
        f"read {config}, {tmp_path / 'conf.d' / '50-cdi.toml'}"
    )
    assert by_name(checks, "CDI").status == "fail"  # the drop-in wins
    assert "['/etc/cdi']" in by_name(checks, "CDI spec directories").found  # the base stays


def test_containerd_config_that_is_not_toml_fails(tmp_path, node_dirs):
    config = containerd_config(tmp_path / "config.toml", "version = 3\n[plugins\n")
    check = by_name(
        runtime(tmp_path, node_dirs["cdi_dir"], containerd("2.0.0"), containerd_config=config),
        "containerd configuration",
    )
    assert check.status == "fail"
    assert check.found.startswith(f"{config} cannot be read: ")


def test_cri_o_reads_cdi_spec_dirs_from_its_drop_ins(tmp_path, node_dirs):
    conf = containerd_config(
        tmp_path / "crio.conf", "[crio.runtime]\ncdi_spec_dirs = ['/etc/cdi']\n"
    )
    containerd_config(
        tmp_path / "crio.conf.d" / "10-dra.conf",
        f"[crio.runtime]\ncdi_spec_dirs = ['{node_dirs['cdi_dir']}']\n",
    )
    crio = RuntimeInfo("cri-o", "1.33.2", "the Node node-1")
    checks = runtime(tmp_path, node_dirs["cdi_dir"], crio, crio_config=conf)
    assert [c.status for c in checks] == ["ok", "ok", "ok", "ok"], checks
    assert by_name(checks, "CDI").found == "always on in CRI-O 1.23.2 and later"
    old = runtime(
        tmp_path, node_dirs["cdi_dir"], RuntimeInfo("cri-o", "1.22.5", "x"), crio_config=conf
    )
    assert by_name(old, "container runtime").status == "fail"


def test_unknown_runtime_without_configuration_warns(tmp_path, node_dirs):
    checks = runtime(tmp_path, node_dirs["cdi_dir"], None)
    runtime_check = by_name(checks, "container runtime")
    assert runtime_check.status == "warn"
    assert runtime_check.found == (
        f"unknown: no CRI socket answered ({tmp_path / 'no-such.sock'} does not exist) and the "
        "Node's runtime is not known; judging by containerd's configuration"
    )
    assert by_name(checks, "containerd configuration").status == "warn"
    assert by_name(checks, "CDI").status == "warn"


def test_a_runtime_socket_that_does_not_answer_is_reported(tmp_path, node_dirs):
    not_a_socket = tmp_path / "containerd.sock"
    not_a_socket.write_text("")
    checks = runtime_checks(
        socket=not_a_socket,
        node_runtime=containerd("2.4.2"),
        containerd_config=tmp_path / "config.toml",
        crio_config=tmp_path / "crio.conf",
        cdi_dir=node_dirs["cdi_dir"],
        timeout=2,
    )
    socket_check = by_name(checks, "CRI socket")
    assert socket_check.status == "warn"
    assert socket_check.found.startswith(f"CRI call on {not_a_socket} failed: ")
    assert socket_check.found.endswith("; the runtime's version is the Node's")
    assert by_name(checks, "container runtime").found == "containerd 2.4.2 (from the Node node-1)"


@pytest.fixture
def cri_runtime(tmp_path) -> Iterator[tuple[Path, dict[str, bytes], list[object]]]:
    """A CRI runtime on a socket: it answers each call with the bytes set for it, as a runtime
    encodes them, and keeps the requests it decoded."""
    path = tmp_path / "cri.sock"
    answers: dict[str, bytes] = {}
    requests: list[object] = []

    def handler(method: str, request_type):
        def answer(request, context):
            requests.append(request)
            return answers[method]

        return grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=request_type.FromString, response_serializer=bytes
        )

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    service = {
        "Version": handler("Version", cri_v1_pb2.VersionRequest),
        "Status": handler("Status", cri_v1_pb2.StatusRequest),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("runtime.v1.RuntimeService", service),)
    )
    server.add_insecure_port(f"unix://{path}")
    server.start()
    try:
        yield path, answers, requests
    finally:
        server.stop(None)


def test_a_runtime_is_asked_its_version_and_configuration_over_cri(cri_runtime):
    path, answers, requests = cri_runtime
    config = {"enableCDI": True, "cdiSpecDirs": ["/etc/cdi", "/var/run/cdi"]}
    # As containerd answers: besides the fields doctor reads, upstream's others (VersionResponse
    # version = 1 and runtime_api_version = 4; StatusResponse status = 1 and
    # runtime_handlers = 3), which decoding skips.
    version = cri_v1_pb2.VersionResponse(runtime_name="containerd", runtime_version="v2.4.2")
    status = cri_v1_pb2.StatusResponse(info={"config": json.dumps(config), "golang": '"go1.24"'})
    answers["Version"] = version.SerializeToString() + b"\x0a\x050.1.0\x22\x02v1"
    answers["Status"] = status.SerializeToString() + b"\x0a\x00\x1a\x00"
    info = query_runtime(path, timeout=5)
    assert info == RuntimeInfo("containerd", "v2.4.2", f"its CRI socket {path}", config)
    assert requests == [
        cri_v1_pb2.VersionRequest(version="v1"),
        cri_v1_pb2.StatusRequest(verbose=True),
    ]


def test_a_runtime_without_a_json_configuration_has_none(cri_runtime):
    path, answers, _ = cri_runtime
    answers["Version"] = cri_v1_pb2.VersionResponse(runtime_name="CRI-O").SerializeToString()
    answers["Status"] = cri_v1_pb2.StatusResponse(info={"config": "{not json"}).SerializeToString()
    assert query_runtime(path, timeout=5) == RuntimeInfo("cri-o", "", f"its CRI socket {path}")


def test_a_runtime_answer_that_does_not_decode_is_an_os_error(cri_runtime):
    path, answers, _ = cri_runtime
    answers["Version"] = b"\xff"  # a field key cut short
    with pytest.raises(OSError, match=f"^CRI call on {path} failed: "):
        query_runtime(path, timeout=5)


# ------------------------------------------------------------------------------- kubelet


@pytest.mark.parametrize(
    ("version", "status", "speaks"),
    [
        ("v1.37.2", "ok", "speaks the DRA gRPC API v1"),
        ("v1.34.0-gke.1200", "ok", "speaks the DRA gRPC API v1"),
        ("v1.33.4", "warn", "speaks the DRA gRPC API v1beta1 only"),
        ("v1.32.0", "warn", "speaks the DRA gRPC API v1beta1 only"),
        ("v1.31.9", "fail", "speaks no DRA gRPC API the agent serves"),
        ("", "warn", "which says nothing"),
    ],
)
def test_kubelet_version_decides_the_dra_api(version, status, speaks):
    check = kubelet_version_check(version)
    assert check.status == status
    assert speaks in check.found


@pytest.mark.parametrize(
    ("version", "overrides", "warned"),
    [
        ("v1.37.2", {}, set()),
        ("v1.34.4", {}, {"partitionable devices", "consumable capacity", "device taints"}),
        ("v1.35.4", {"DRAPartitionableDevices": True, "DRAConsumableCapacity": True,
                     "DRADeviceTaints": True}, {ALL_MODE_OVER_COUNTERS}),
        ("v1.36.0", {"DRADeviceTaints": False}, {"device taints"}),
    ],
)  # fmt: skip
def test_release_warnings_name_the_gates_off_and_the_scheduler_crash(version, overrides, warned):
    assert release_warnings(version, gates_on(version, overrides)) == warned


# ------------------------------------------------------------------------------- the report


def test_warnings_do_not_fail_the_report():
    warned = DoctorReport("n", FAKE, "fake", (Section("s", (DoctorCheck.warn("a", "b", "c"),)),))
    assert (warned.failed, warned.exit_code) == (False, 0)
    failed = DoctorReport("n", FAKE, "fake", (Section("s", (DoctorCheck.fail("a", "b", "c"),)),))
    assert (failed.failed, failed.exit_code) == (True, 1)
    assert failed.to_json() == {
        "node": "n",
        "driver": FAKE,
        "backend": "fake",
        "ok": False,
        "counts": {"ok": 0, "warn": 0, "fail": 1, "skip": 0},
        "sections": [
            {"title": "s", "checks": [{"name": "a", "status": "fail", "found": "b", "fix": "c"}]}
        ],
    }
    assert "  [FAIL] a: b\n         fix: c\n" in failed.render_text()


def test_api_checks_are_skipped_without_a_kubeconfig(no_cluster, node_dirs):
    report = run_doctor(
        DoctorSettings(node_name="node-1", **node_dirs),
        from_objects("fake", fake_plugin.FakePlugin),
    )
    api, kubelet = report.sections[0], report.sections[1]
    assert [c.status for c in api.checks] == ["skip"]
    assert "no kubeconfig (--kubeconfig, KUBECONFIG) and not in a pod" in api.checks[0].found
    assert [c.status for c in kubelet.checks] == ["skip"]


def test_unreachable_api_server_fails_once(no_cluster, node_dirs, tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": f"https://127.0.0.1:{port}",
                            "insecure-skip-tls-verify": True,
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    settings = DoctorSettings(
        node_name="node-1", kubeconfig=str(kubeconfig), timeout=3, **node_dirs
    )
    report = run_doctor(settings, from_objects("fake", fake_plugin.FakePlugin))
    api = report.sections[0].checks
    assert [(c.name, c.status) for c in api] == [("API server", "fail")]
    assert api[0].found.startswith(f"unreachable at https://127.0.0.1:{port}: ")
    assert report.sections[1].checks[0].status == "skip"


def test_unreadable_kubeconfig_fails(no_cluster, node_dirs, tmp_path):
    settings = DoctorSettings(node_name="node-1", kubeconfig=str(tmp_path / "missing"), **node_dirs)
    check = run_doctor(settings, from_objects("fake", fake_plugin.FakePlugin)).sections[0].checks[0]
    assert check.status == "fail"
    assert check.found.startswith(f"cannot load kubeconfig {tmp_path / 'missing'}: ")


# ------------------------------------------------------------------------------- plugins' checks


class RaisingPlugin:
    @hookimpl
    def dra_doctor_checks(self, context: NodeContext):
        raise RuntimeError("sensor bus gone")


class WrongPlugin:
    @hookimpl
    def dra_doctor_checks(self, context: NodeContext):
        return ["not a check"]


def test_a_plugin_whose_checks_raise_gets_a_failed_check_naming_it():
    hooks = from_objects(
        "fake", fake_plugin.FakePlugin, ("sensors", RaisingPlugin()), ("wrong", WrongPlugin())
    )
    context = NodeContext(node_name="node-1", driver_name=FAKE)
    checks = {plugin: c for plugin, c in hooks.doctor_checks(context) if plugin != "fake"}
    assert checks["sensors"].status == "fail"
    assert checks["sensors"].found == (
        "plugin 'sensors' could not run its checks: RuntimeError: sensor bus gone"
    )
    assert checks["wrong"].found == "dra_doctor_checks returned str, not DoctorCheck"
    assert [c.name for p, c in hooks.doctor_checks(context) if p == "fake"] == ["inventory"]


def test_plugins_other_than_the_backend_get_their_own_section(no_cluster, node_dirs):
    hooks = from_objects("fake", fake_plugin.FakePlugin, ("sensors", RaisingPlugin()))
    report = run_doctor(DoctorSettings(node_name="node-1", **node_dirs), hooks)
    assert [s.title for s in report.sections][-2:] == ["backend fake", "plugin sensors"]
    assert report.failed


# ------------------------------------------------------------------------------- the fake backend


def fake_checks(tmp_path: Path, **options: str):
    hooks = from_objects("fake", fake_plugin.FakePlugin)
    context = NodeContext(node_name="node-1", driver_name=FAKE, options=options)
    return [c for _, c in hooks.doctor_checks(context)]


def test_fake_backend_checks_its_files(tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("devices:\n  - name: dev-a\n")
    control = tmp_path / "control.yaml"
    control.write_text("unhealthy: {dev-a: hot}\n")
    checks = fake_checks(tmp_path, inventory=str(inventory), control_file=str(control))
    assert [(c.name, c.status) for c in checks] == [("inventory", "ok"), ("control file", "ok")]
    assert checks[0].found == f"1 device spec from file {inventory}"


def test_fake_backend_reports_an_invalid_inventory(tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("devices:\n  - name: dev-a\n    colour: red\n")
    (check,) = fake_checks(tmp_path, inventory=str(inventory))
    assert check.status == "fail"
    assert f"inventory file {inventory}" in check.found and "colour" in check.found


def test_fake_backend_reports_an_invalid_control_file(tmp_path):
    control = tmp_path / "control.yaml"
    control.write_text("add:\n  - name: dev-0\n")  # clashes with the built-in inventory
    checks = fake_checks(tmp_path, control_file=str(control))
    check = by_name(checks, "control file")
    assert check.status == "fail"
    assert "device name 'dev-0' is already in the inventory" in check.found


@pytest.mark.parametrize(
    ("git_version", "dropped", "warned"),
    [
        ("v1.35.4", frozenset(), True),
        ("v1.36.3", frozenset(), False),
        ("v1.34.4", frozenset(), False),
        ("v1.35.4", frozenset({"sharedCounters", "consumesCounters"}), False),
    ],
)
def test_doctor_warns_where_the_scheduler_crashes_on_all_mode_over_counters(
    git_version, dropped, warned
):
    from dra_backend_fake.inventory import build, default_specs

    from dra_core.doctor.cluster import _scheduler_bug_checks
    from dra_core.model import Inventory
    from dra_core.slices.features import ServerFeatures

    server = ServerFeatures(dropped=dropped)
    checks = _scheduler_bug_checks({"gitVersion": git_version}, server, build(default_specs()))
    assert [c.status for c in checks] == (["warn"] if warned else [])
    if warned:
        assert "crashes on a claim with allocationMode All" in checks[0].found
        assert "5 devices consuming counters here (e.g. big-0)" in checks[0].found
        assert checks[0].fix.startswith("upgrade the control plane to 1.36")
    # Nothing consuming counters on this node: nothing to warn about.
    assert _scheduler_bug_checks({"gitVersion": git_version}, server, Inventory()) == []
