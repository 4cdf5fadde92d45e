"""`dra-core demo`, the README's main job, runs the whole flow and cleans up after itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dra_backend_fake.inventory import build, default_specs

from dra_core.demo import provide_binaries
from dra_core.slices.build import build_slices
from dra_core.slices.features import release_features, safe_inventory

# A progress line of the build script as the demo shows it: indented, the elapsed m:ss first.
BUILD_LINE = re.compile(r"^ {6}\d+:\d\d \[build\.sh\] ", re.MULTILINE)


def _demo(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "demo", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_build_progress_is_shown_as_it_comes_with_the_elapsed_time(tmp_path: Path) -> None:
    script = tmp_path / "build.sh"
    script.write_text(
        "echo '[build.sh] [etcd] build: go build' >&2\n"
        "sleep 2\n"
        "echo '[build.sh] [etcd] built in 2s' >&2\n"
        f"echo {tmp_path / 'bin'}\n"
    )
    started = time.monotonic()
    heard: list[tuple[float, str]] = []
    binaries = provide_binaries(
        lambda text: heard.append((time.monotonic() - started, text)), script, quiet_interval=0.5
    )
    assert binaries == tmp_path / "bin"
    said = [text for _, text in heard]
    assert said[0] == "      0:00 [build.sh] [etcd] build: go build"
    assert heard[0][0] < 1.5, "the first line waited for the end of the build"
    assert said[-1] == "      0:02 [build.sh] [etcd] built in 2s"
    # Two seconds without a line, a quiet interval of half a second: told it is still building.
    quiet = said[1:-1]
    assert quiet and all(text.endswith(" ... still building") for text in quiet), said
    assert len(quiet) <= 4, said


@pytest.mark.controlplane
def test_demo_runs_end_to_end(control_plane):  # the fixture provides the built binaries
    out = _demo()
    for step in range(1, 8):
        assert f"[{step}/7]" in out
    assert BUILD_LINE.search(out), out[:2000]  # the build script's lines, with elapsed time
    # The built-in inventory (ten devices, a counter set) as the agent publishes it on this
    # API server: its release's counter layout, without what a gate that is off leaves out.
    server = release_features(control_plane.k8s_version, control_plane.enabled_gates())
    published, _ = safe_inventory(build(default_specs()), server)
    slices = build_slices(
        "fake.dra-core.dev", "demo-node", "demo-node", published, 1,
        **server.layout,
    )  # fmt: skip
    sets = len(published.counter_sets)
    counted = f"{len(published.devices)} devices" + (
        f" and {sets} counter set{'s' * (sets != 1)}" if sets else ""
    )
    assert f"published {counted} in {len(slices)} ResourceSlice" in out, out
    assert "allocated device" in out and "CDI devices dra-core.dev/fake=" in out
    assert '"kind": "dra-core.dev/fake"' in out
    assert out.rstrip().endswith("done: control plane stopped, temporary files removed")


@pytest.mark.controlplane
def test_demo_takes_the_backends_options_from_the_environment(control_plane):
    # 1000 devices fill eight slices of at most 128, written one after another: the demo
    # counts them once the pool is complete, not at the first slice it sees.
    out = _demo(env={"DRA_FAKE_DEVICES": "1000"})
    assert "published 1000 devices in 8 ResourceSlices (pool demo-node generation 1)" in out


@pytest.mark.controlplane
def test_demo_runs_the_i915_backend_on_a_sysfs_tree_given_as_options(control_plane, tmp_path):
    from dra_backend_i915.testing import build_demo

    build_demo(tmp_path)  # a Flex 170, an Arc A770, an Arc B580, a Tiger Lake iGPU
    try:
        out = _demo(
            "--backend", "i915",
            "--sysfs-root", str(tmp_path / "sys"), "--devfs-root", str(tmp_path / "dev"),
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert "starting the node agent (backend 'i915', driver gpu.intel.com)" in out
    assert re.search(r"published \d+ devices( and \d+ counter sets?)? in \d+ ResourceSlices?", out)
    assert "CDI devices intel.com/gpu=" in out
    # The CDI spec names the device nodes of the tree given, not the host's /dev.
    assert f'"hostPath": "{tmp_path}/dev/dri/' in out
    assert out.rstrip().endswith("done: control plane stopped, temporary files removed")
