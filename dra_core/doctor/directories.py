"""The directories' checks: the kubelet's plugin registration and plugin directories exist and
are writable, and the CDI directory is (or can be created)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dra_core.hookspecs import DoctorCheck

if TYPE_CHECKING:  # for its type only: the report runs these checks, so it imports this module
    from dra_core.doctor.report import DoctorSettings

__all__ = ("directory_checks",)


def _writable(path: Path) -> bool:
    """Whether this process may create files in the directory (read-only mounts included)."""
    return os.access(path, os.W_OK | os.X_OK)


def directory_checks(settings: DoctorSettings, driver: str) -> list[DoctorCheck]:
    """The kubelet's registration and plugin directories, and the CDI directory."""
    kubelet_makes = (
        "the kubelet makes it when it starts: check that the path is under the kubelet's "
        "--root-dir (default /var/lib/kubelet) and, in a pod, that the host's directory is "
        "mounted at the same path"
    )
    own = settings.plugins_dir / driver
    checks = [
        _directory_check(
            "plugin registration directory",
            settings.registration_dir,
            "--registration-dir (DRA_REGISTRATION_DIR)",
            missing_fix=kubelet_makes,
            purpose="the agent registers with the kubelet through a socket there",
        ),
        _directory_check(
            "plugin directory",
            settings.plugins_dir,
            "--plugins-dir (DRA_PLUGINS_DIR)",
            missing_fix=kubelet_makes,
            purpose=f"the agent keeps its socket and checkpoint in {own}",
        ),
    ]
    if own.is_dir() and not _writable(own):
        checks.append(
            DoctorCheck.fail(
                "driver directory",
                f"{own} exists but this process cannot write to it",
                f"give the agent's user write access to {own} (or remove it; the agent makes it)",
            )
        )
    checks.append(_cdi_directory_check(settings.cdi_dir))
    return checks


def _directory_check(
    name: str, path: Path, flag: str, *, missing_fix: str, purpose: str
) -> DoctorCheck:
    if not path.exists():
        return DoctorCheck.fail(name, f"{path} does not exist", f"{missing_fix}; or set {flag}")
    if not path.is_dir():
        return DoctorCheck.fail(name, f"{path} is not a directory", f"set {flag} to a directory")
    if not _writable(path):
        found = f"{path} is not writable by this process, and {purpose}"
        fix = (
            "run the agent as root (the kubelet's directories are root's), and mount the "
            "host's directory read-write in its pod"
        )
        return DoctorCheck.fail(name, found, fix)
    return DoctorCheck.ok(name, f"{path} exists and is writable")


def _cdi_directory_check(path: Path) -> DoctorCheck:
    """Like `_directory_check`, but the agent makes the CDI directory when it is missing."""
    name = "CDI directory"
    fix = (
        "the agent writes a CDI spec there for every prepared claim: mount the host's "
        "directory read-write in its pod, or run it as a user that may write there"
    )
    if path.exists():
        if not path.is_dir():
            return DoctorCheck.fail(name, f"{path} is not a directory", "set --cdi-dir to one")
        if not _writable(path):
            return DoctorCheck.fail(name, f"{path} is not writable, so every prepare fails", fix)
        return DoctorCheck.ok(name, f"{path} exists and is writable")
    parent = next(p for p in path.parents if p.exists())
    if parent.is_dir() and _writable(parent):
        return DoctorCheck.ok(name, f"{path} does not exist yet; the agent makes it (in {parent})")
    return DoctorCheck.fail(name, f"{path} does not exist and {parent} is not writable", fix)
