"""The Helm CLI for the chart tests, built from its Go module.

``tests/deploy/helm/build.sh`` builds ``helm.sh/helm/v4/cmd/helm`` at the version
``tests/deploy/helm/go.mod`` requires, through ``tests/go-build.sh``, into
``${DRA_TEST_CACHE:-~/.cache/dra-core}/helm`` (a few minutes the first time, reused after).
:class:`Helm` runs it with its own empty configuration, cache and data directories, so the
user's Helm set-up neither leaks in nor is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = (
    "BUILD_SCRIPT",
    "CHART",
    "Helm",
    "HelmError",
    "HelmUnavailable",
    "build",
    "pinned_version",
)

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = Path(__file__).resolve().parent / "helm"
BUILD_SCRIPT = MODULE_DIR / "build.sh"
CHART = ROOT / "deploy" / "helm" / "dra-core"
BUILD_TIMEOUT = 1800.0


class HelmUnavailable(Exception):
    """The Helm CLI cannot be had; ``go_missing`` when there is no Go toolchain to build it."""

    def __init__(self, message: str, *, go_missing: bool = False) -> None:
        super().__init__(message)
        self.go_missing = go_missing


class HelmError(Exception):
    """``helm`` exited non-zero; the message has its output."""

    def __init__(self, args: Iterable[str], result: subprocess.CompletedProcess[str]) -> None:
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        super().__init__(
            f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}"
        )


def pinned_version() -> str:
    """The version of ``helm.sh/helm/v4`` that tests/deploy/helm/go.mod requires."""
    for line in (MODULE_DIR / "go.mod").read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "helm.sh/helm/v4":
            return words[1]
    msg = f"{MODULE_DIR / 'go.mod'} does not require helm.sh/helm/v4"
    raise ValueError(msg)


def build(echo: Callable[[str], None] = lambda line: None) -> Path:
    """Build (or find the cached build of) the Helm CLI; each line of build output goes to
    ``echo`` as it comes. Raises :class:`HelmUnavailable`, with ``go_missing`` when there is
    neither a cached build nor a Go toolchain."""
    try:
        proc = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        msg = f"cannot run {BUILD_SCRIPT}: {exc}"
        raise HelmUnavailable(msg) from exc
    assert proc.stdout is not None and proc.stderr is not None
    log = []
    for line in proc.stderr:  # the first build downloads and compiles for minutes: show it
        log.append(line)
        echo(line.rstrip("\n"))
    try:
        stdout, _ = proc.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        msg = f"building the Helm CLI with {BUILD_SCRIPT} timed out"
        raise HelmUnavailable(msg) from exc
    if proc.returncode != 0 and shutil.which("go") is None:  # and no cached build
        msg = f"no Go toolchain on PATH to build the Helm CLI with {BUILD_SCRIPT}"
        raise HelmUnavailable(msg, go_missing=True)
    if proc.returncode != 0:
        msg = f"building the Helm CLI with {BUILD_SCRIPT} failed ({proc.returncode}):\n"
        raise HelmUnavailable(msg + "".join(log))
    lines = stdout.strip().splitlines()
    binary = Path(lines[-1]) if lines else Path()
    if not lines or not os.access(binary, os.X_OK):
        msg = f"{BUILD_SCRIPT} printed {stdout!r}, not the path of an executable"
        raise HelmUnavailable(msg)
    return binary


@dataclass
class Helm:
    """The ``helm`` binary, run with private Helm directories under ``home``."""

    binary: Path
    home: Path

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
        for name in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{name}_HOME"] = str(self.home / name.lower())
        env.pop("KUBECONFIG", None)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    def run(
        self, *args: str, kubeconfig: Path | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``helm ARGS``; :class:`HelmError` when it fails."""
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(kubeconfig),
            check=False,
        )
        if result.returncode != 0:
            raise HelmError(args, result)
        return result

    def values_args(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        values_files: Iterable[Path] = (),
        set_files: Mapping[str, Path] | None = None,
    ) -> list[str]:
        """``-f``/``--set-file`` arguments; ``values`` goes through a file of its own."""
        args = []
        for path in values_files:
            args += ["-f", str(path)]
        if values:
            path = Path(tempfile.mkstemp(suffix=".yaml", dir=self.home)[1])
            path.write_text(yaml.safe_dump(dict(values)))
            args += ["-f", str(path)]
        for key, file in (set_files or {}).items():
            args += ["--set-file", f"{key}={file}"]
        return args

    def template(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "dra-core",
        namespace: str = "dra-core",
        values_files: Iterable[Path] = (),
        set_files: Mapping[str, Path] | None = None,
        chart: Path = CHART,
        kube_version: str | None = None,
    ) -> list[dict[str, Any]]:
        """The objects ``helm template`` renders, for a cluster of ``kube_version`` (default:
        Helm's own client version)."""
        result = self.run(
            "template",
            release,
            str(chart),
            "--namespace",
            namespace,
            *(["--kube-version", kube_version] if kube_version else []),
            *self.values_args(values, values_files=values_files, set_files=set_files),
        )
        return [d for d in yaml.safe_load_all(result.stdout) if d is not None]

    def lint(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        values_files: Iterable[Path] = (),
        set_files: Mapping[str, Path] | None = None,
        chart: Path = CHART,
    ) -> subprocess.CompletedProcess[str]:
        """``helm lint --strict``; :class:`HelmError` when the chart fails it."""
        return self.run(
            "lint",
            "--strict",
            str(chart),
            *self.values_args(values, values_files=values_files, set_files=set_files),
        )
