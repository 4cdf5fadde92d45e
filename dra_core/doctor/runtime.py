"""The container runtime's checks: which runtime, its version, CDI enabled, and the agent's CDI
directory among those the runtime reads specs from.

The runtime is asked over its CRI socket when one answers (its version and, from containerd,
the configuration it runs with); otherwise the Node's report and the runtime's configuration
files stand in.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dra_core.hookspecs import DoctorCheck
from dra_core.kubelet.proto import cri_v1_pb2, cri_v1_pb2_grpc

__all__ = (
    "DEFAULT_CDI_SPEC_DIRS",
    "DEFAULT_CONTAINERD_CONFIG",
    "DEFAULT_CRIO_CONFIG",
    "DEFAULT_RUNTIME_SOCKETS",
    "RuntimeInfo",
    "parse_version",
    "query_runtime",
    "runtime_checks",
)

#: Where containerd and CRI-O read their configuration by default.
DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_CRIO_CONFIG = Path("/etc/crio/crio.conf")
#: The CRI sockets asked when none is given, in this order.
DEFAULT_RUNTIME_SOCKETS = (Path("/run/containerd/containerd.sock"), Path("/var/run/crio/crio.sock"))
#: The CDI spec directories containerd and CRI-O read when their configuration names none.
DEFAULT_CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")

#: CDI support: containerd 1.7 (off by default), on by default in 2.0, always on from 2.4
#: (``enable_cdi`` is ignored); CRI-O always on from 1.23.2.
_CONTAINERD_CDI = (1, 7)
_CONTAINERD_CDI_DEFAULT = (2, 0)
_CONTAINERD_CDI_ALWAYS = (2, 4)
_CRIO_CDI = (1, 23, 2)
#: containerd's CRI plugin sections that hold ``enable_cdi`` and ``cdi_spec_dirs``, by
#: configuration version (3: containerd 2.x; 2: 1.7 and migrated by 2.x; 1: older).
_CONTAINERD_CRI_SECTIONS = (
    ("io.containerd.cri.v1.runtime",),
    ("io.containerd.grpc.v1.cri",),
    ("cri",),
)


def parse_version(text: str) -> tuple[int, ...] | None:
    """``(1, 34, 2)`` from ``v1.34.2``, ``1.7.27-0ubuntu1``, ``v1.33.1-gke.100``; None if none."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


@dataclass(frozen=True)
class RuntimeInfo:
    """The container runtime: its name (``containerd``, ``cri-o``) and version, and whence."""

    name: str
    version: str
    source: str
    #: The runtime's CRI configuration as it reports it (containerd's verbose status), if any.
    live_config: Mapping[str, Any] | None = None

    @property
    def parsed_version(self) -> tuple[int, ...] | None:
        return parse_version(self.version)

    @classmethod
    def from_node(cls, text: str, node_name: str) -> RuntimeInfo | None:
        """``containerd://2.4.2`` (the Node's ``containerRuntimeVersion``); None if not that."""
        name, sep, version = text.partition("://")
        if not sep:
            return None
        return cls(name.lower(), version, f"the Node {node_name}")


def query_runtime(socket: Path, timeout: float = 5.0) -> RuntimeInfo:
    """Ask a CRI runtime on ``socket`` its name and version (CRI ``Version``) and, from
    containerd, its CRI configuration (verbose ``Status``). Raises ``OSError`` on failure,
    a response that does not decode included."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = cri_v1_pb2_grpc.RuntimeServiceStub(channel)
        try:
            version = stub.Version(cri_v1_pb2.VersionRequest(version="v1"), timeout=timeout)
            status = stub.Status(cri_v1_pb2.StatusRequest(verbose=True), timeout=timeout)
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            msg = f"CRI call on {socket} failed: {detail}"
            raise OSError(msg) from None
    try:
        config = json.loads(status.info.get("config", "null"))
    except ValueError:
        config = None
    return RuntimeInfo(
        version.runtime_name.lower() or "unknown",
        version.runtime_version,
        f"its CRI socket {socket}",
        config if isinstance(config, dict) else None,
    )


# ---------------------------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ConfigFile:
    """A runtime's TOML configuration, merged from its drop-ins; what went wrong reading it."""

    path: Path
    data: Mapping[str, Any] | None = None
    read: tuple[Path, ...] = ()
    problem: str = ""

    @property
    def missing(self) -> bool:
        return self.data is None and not self.problem


def _read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _merge(base: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """``more`` over ``base``, tables merged key by key (as the runtimes merge drop-ins)."""
    merged = dict(base)
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _load_config(
    path: Path, drop_ins_of: Callable[[Mapping[str, Any]], Sequence[Path]]
) -> _ConfigFile:
    """The file at ``path`` merged with the drop-ins ``drop_ins_of`` names from its content."""
    try:
        data = _read_toml(path)
    except FileNotFoundError:
        return _ConfigFile(path)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return _ConfigFile(path, problem=f"{path} cannot be read: {exc}")
    read = [path]
    for drop_in in drop_ins_of(data):
        try:
            data = _merge(data, _read_toml(drop_in))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            return _ConfigFile(path, problem=f"{drop_in} cannot be read: {exc}")
        read.append(drop_in)
    return _ConfigFile(path, data, tuple(read))


def _containerd_config(path: Path) -> _ConfigFile:
    """containerd's config with the files its ``imports`` name (globs, relative to it)."""

    def imported(data: Mapping[str, Any]) -> list[Path]:
        patterns = data.get("imports") or []
        files: list[Path] = []
        for pattern in patterns if isinstance(patterns, list) else []:
            full = Path(pattern) if Path(pattern).is_absolute() else path.parent / pattern
            files += sorted(full.parent.glob(full.name)) if "*" in full.name else [full]
        return files

    return _load_config(path, imported)


def _crio_config(path: Path) -> _ConfigFile:
    """CRI-O's config with its drop-ins (``crio.conf.d/*.conf`` beside it, in name order)."""
    drop_in_dir = path.with_name(path.name + ".d")
    return _load_config(
        path, lambda _: sorted(drop_in_dir.glob("*.conf")) if drop_in_dir.is_dir() else []
    )


def _table(data: Mapping[str, Any] | None, *keys: str) -> Mapping[str, Any]:
    for key in keys:
        if not isinstance(data, Mapping):
            return {}
        data = data.get(key)
    return data if isinstance(data, Mapping) else {}


def _containerd_setting(config: _ConfigFile, key: str) -> tuple[Any, str]:
    """A CRI setting of containerd's config and the section it is in; (None, "") if unset."""
    for section in _CONTAINERD_CRI_SECTIONS:
        table = _table(config.data, "plugins", *section)
        if key in table:
            return table[key], f"[plugins.{'.'.join(repr(s) for s in section)}] of {config.path}"
    return None, ""


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def runtime_checks(
    *,
    socket: Path | None,
    node_runtime: RuntimeInfo | None,
    containerd_config: Path,
    crio_config: Path,
    cdi_dir: Path,
    timeout: float = 5.0,
) -> list[DoctorCheck]:
    """Which runtime, its version, CDI enabled, and the agent's CDI directory read by it."""
    name = "container runtime"
    asked, socket_problem = _find_runtime(socket, timeout)
    runtime = asked or node_runtime
    checks: list[DoctorCheck] = []
    if runtime is None:
        kind = "cri-o" if crio_config.exists() and not containerd_config.exists() else "containerd"
        found = (
            f"unknown: no CRI socket answered ({socket_problem}) and the Node's runtime is not "
            f"known; judging by {'CRI-O' if kind == 'cri-o' else kind}'s configuration"
        )
        fix = "give the runtime's socket with --runtime-socket, or run doctor with the API server"
        checks.append(DoctorCheck.warn(name, found, fix))
    else:
        kind = runtime.name
        if asked is None and socket is not None:  # the socket asked for did not answer
            fix = "--runtime-socket must be the runtime's CRI socket (using it needs root)"
            found = f"{socket_problem}; the runtime's version is the Node's"
            checks.append(DoctorCheck.warn("CRI socket", found, fix))
    if kind == "containerd":
        return checks + _containerd_checks(runtime, containerd_config, cdi_dir)
    if kind in ("cri-o", "crio"):
        return checks + _crio_checks(runtime, crio_config, cdi_dir)
    assert runtime is not None  # an unknown kind came from the runtime itself
    found = f"{runtime.name} {runtime.version} (from {runtime.source}), which doctor does not know"
    fix = "make sure it supports CDI and reads the agent's --cdi-dir; containerd and CRI-O do"
    return [*checks, DoctorCheck.warn(name, found, fix)]


def _find_runtime(socket: Path | None, timeout: float) -> tuple[RuntimeInfo | None, str]:
    """The first runtime that answers on ``socket`` (or the default sockets); else why none."""
    candidates = [socket] if socket is not None else list(DEFAULT_RUNTIME_SOCKETS)
    problems = []
    for candidate in candidates:
        if not candidate.exists():
            problems.append(f"{candidate} does not exist")
            continue
        try:
            return query_runtime(candidate, timeout), ""
        except OSError as exc:
            problems.append(str(exc))
    return None, "; ".join(problems)


def _runtime_version_check(
    runtime: RuntimeInfo, label: str, minimum: tuple[int, ...]
) -> DoctorCheck:
    name = "container runtime"
    version = runtime.parsed_version
    found = f"{label} {runtime.version} (from {runtime.source})"
    if version is not None and version < minimum:
        wanted = ".".join(str(p) for p in minimum)
        fix = f"upgrade {label} to {wanted} or later" + (
            " (2.x turns CDI on by default)" if label == "containerd" else ""
        )
        return DoctorCheck.fail(name, f"{found}, which cannot inject CDI devices", fix)
    return DoctorCheck.ok(name, found)


def _config_check(label: str, config: _ConfigFile) -> DoctorCheck:
    name = f"{label} configuration"
    if config.problem:
        fix = f"fix the file: {label} does not start with a configuration it cannot parse"
        return DoctorCheck.fail(name, config.problem, fix)
    if config.missing:
        fix = (
            f"if {label}'s configuration is elsewhere, pass it with --{label.lower()}-config "
            f"(or run doctor on the node, where it is)"
        )
        return DoctorCheck.warn(name, f"{config.path} not found: judging by the defaults", fix)
    return DoctorCheck.ok(name, "read " + ", ".join(str(p) for p in config.read))


def _containerd_checks(
    runtime: RuntimeInfo | None, config_path: Path, cdi_dir: Path
) -> list[DoctorCheck]:
    checks = []
    if runtime is not None:  # else the caller said it is unknown
        checks.append(_runtime_version_check(runtime, "containerd", _CONTAINERD_CDI))
    if runtime is not None and runtime.live_config is not None:
        # What the running containerd uses beats any file: it may run with another config.
        live = runtime.live_config
        running = f"the running containerd's configuration, from {runtime.source}"
        enabled, enabled_where = live.get("enableCDI"), running
        dirs, dirs_where = live.get("cdiSpecDirs"), running
    else:
        config = _containerd_config(config_path)
        checks.append(_config_check("containerd", config))
        enabled, enabled_where = _containerd_setting(config, "enable_cdi")
        dirs, dirs_where = _containerd_setting(config, "cdi_spec_dirs")
    checks.append(_containerd_cdi_check(runtime, enabled, enabled_where, config_path))
    checks.append(_spec_dirs_check("containerd", dirs, dirs_where, cdi_dir))
    return checks


def _containerd_cdi_check(
    runtime: RuntimeInfo | None, enabled: object, where: str, config_path: Path
) -> DoctorCheck:
    name = "CDI"
    version = runtime.parsed_version if runtime is not None else None
    section = "[plugins.'io.containerd.cri.v1.runtime'] (config version 3)"
    if version is None or version < _CONTAINERD_CDI_DEFAULT:
        section = '[plugins."io.containerd.grpc.v1.cri"]'
    enable = f"set enable_cdi = true under {section} in {config_path} and restart containerd"
    if version is not None and version < _CONTAINERD_CDI:
        return DoctorCheck.skip(name, "this containerd has no CDI support")
    if version is not None and version >= _CONTAINERD_CDI_ALWAYS:
        note = f" (enable_cdi = false in {where} is ignored)" if enabled is False else ""
        return DoctorCheck.ok(name, f"always on in containerd 2.4 and later{note}")
    if enabled is True:
        return DoctorCheck.ok(name, f"enabled: enable_cdi = true in {where}")
    if enabled is False:
        found = f"disabled: enable_cdi = false in {where}, so no claim's device reaches a container"
        return DoctorCheck.fail(name, found, enable)
    if version is not None and version >= _CONTAINERD_CDI_DEFAULT:
        return DoctorCheck.ok(name, "on by default in containerd 2.x (enable_cdi is not set)")
    if version is not None:
        found = "off: containerd 1.7 enables CDI only with enable_cdi = true, which is not set"
        return DoctorCheck.fail(name, found, enable)
    found = "enable_cdi is not set, and CDI is on by default only from containerd 2.0"
    return DoctorCheck.warn(name, found, f"upgrade to containerd 2.x, or {enable}")


def _crio_checks(
    runtime: RuntimeInfo | None, config_path: Path, cdi_dir: Path
) -> list[DoctorCheck]:
    config = _crio_config(config_path)
    checks = []
    if runtime is not None:  # else the caller said it is unknown
        checks.append(_runtime_version_check(runtime, "CRI-O", _CRIO_CDI))
    checks.append(_config_check("CRI-O", config))
    version = runtime.parsed_version if runtime is not None else None
    if version is None or version >= _CRIO_CDI:
        checks.append(DoctorCheck.ok("CDI", "always on in CRI-O 1.23.2 and later"))
    dirs = _table(config.data, "crio", "runtime").get("cdi_spec_dirs")
    checks.append(_spec_dirs_check("CRI-O", dirs, f"[crio.runtime] of {config_path}", cdi_dir))
    return checks


def _spec_dirs_check(label: str, dirs: object, where: str, cdi_dir: Path) -> DoctorCheck:
    name = "CDI spec directories"
    if dirs is None:
        dirs, where = list(DEFAULT_CDI_SPEC_DIRS), f"{label}'s default"
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        fix = "cdi_spec_dirs must be a list of directories"
        return DoctorCheck.fail(name, f"cdi_spec_dirs in {where} is {dirs!r}", fix)
    # realpath: /var/run is often a link to /run, and either may be named.
    if any(os.path.realpath(d) == os.path.realpath(cdi_dir) for d in dirs):
        return DoctorCheck.ok(name, f"{label} reads {dirs} ({where}), which holds {cdi_dir}")
    found = (
        f"{label} reads CDI specs from {dirs} ({where}), not from {cdi_dir} where the agent "
        f"writes them, so containers get no device"
    )
    fix = (
        f"add {cdi_dir} to cdi_spec_dirs and restart {label}, or run the agent with --cdi-dir "
        f"set to one of them"
    )
    return DoctorCheck.fail(name, found, fix)
