"""Pytest plugin: every CDI spec a test writes is checked with the official CDI Go library.

Registered from ``tests/conftest.py`` (``pytest_plugins``), so it covers every test of the
session, ``backends/*/tests`` included. ``dra_core.cdi.CdiSpecs.write`` is wrapped for the
whole session: each spec it writes during a test is copied at write time, with the IDs it
returned. When the test body has passed, one run of ``tests/cdichecker`` (built from
``tags.cncf.io/container-device-interface``, the code containerd and CRI-O run) loads each
copy as a CDI spec directory, resolves the IDs and injects them into an OCI spec as containerd
does; a spec or device the library refuses fails the test with the library's message, naming
the spec file and the device ID. Tests that write no spec start no process.

The library completes a device node from ``lstat`` of its ``hostPath``. The host state is
taken when the spec is written (a prepared claim's spec is used by the runtime right away,
while a test may remove the nodes again before it ends): each ``hostPath`` is reproduced in a
scratch directory as what ``lstat`` saw then (the same character or block device numbers and
mode, a FIFO, a symlink, a plain file, or nothing), and the copy points there; messages name
the original paths. Without the right to ``mknod`` the original path is checked as it is at
the end of the test.

The checker is built once per session on first use by ``tests/cdichecker/build.sh`` (cached
under ``${DRA_TEST_CACHE:-~/.cache/dra-core}/cdichecker``; the build's output is shown). With
no Go toolchain the check is skipped with a warning in the summary, unless ``CI`` is true,
where every test that wrote a spec fails instead. A test that writes broken specs on purpose
opts out with ``@pytest.mark.cdi_unchecked(reason)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dra_core.cdi import CdiSpecs
from dra_core.model import PreparedClaim

__all__ = (
    "CHECKER_DIR",
    "MARKER",
    "CdiChecker",
    "CheckResult",
    "CheckerUnavailable",
    "cdi_checker",
)

CHECKER_DIR = Path(__file__).resolve().parent / "cdichecker"
MARKER = "cdi_unchecked"
_MARKER_HELP = (
    f"{MARKER}(reason): the test writes CDI specs a container runtime would refuse on purpose; "
    "they are not checked with the CDI library"
)
_BUILD_TIMEOUT = 900.0
_RUN_TIMEOUT = 120.0
_SPEC_SHOWN = 4000  # characters of a refused spec quoted in the failure message

Ids = Mapping[tuple[str, str | None], tuple[str, ...]]
_WriteResult = dict[tuple[str, str | None], tuple[str, ...]]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


class CheckerUnavailable(Exception):
    """The checker binary cannot be had; ``go_missing`` when there is no Go toolchain."""

    def __init__(self, message: str, *, go_missing: bool = False) -> None:
        super().__init__(message)
        self.go_missing = go_missing


@dataclass(frozen=True)
class CheckResult:
    """The checker's answer: ``ok`` and the per-case reports (see tests/cdichecker/main.go)."""

    ok: bool
    library: str
    cases: tuple[dict[str, Any], ...]
    stderr: str


class CdiChecker:
    """The ``cdichecker`` binary: `check` runs it once for any number of cases."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def check(self, cases: Sequence[Mapping[str, Any]]) -> CheckResult:
        """Check ``cases`` ({"name", "specDir", "devices"}); CheckerUnavailable if it crashes."""
        payload = json.dumps({"cases": list(cases)})
        try:
            proc = subprocess.run(
                [str(self.binary)],
                input=payload,
                capture_output=True,
                text=True,
                timeout=_RUN_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            msg = f"running the CDI checker {self.binary} failed: {exc}"
            raise CheckerUnavailable(msg) from exc
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = None
        if proc.returncode not in (0, 1) or not isinstance(report, dict):
            msg = (
                f"the CDI checker {self.binary} exited {proc.returncode} without a report:\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
            raise CheckerUnavailable(msg)
        return CheckResult(
            ok=bool(report.get("ok")) and proc.returncode == 0,
            library=str(report.get("library", "")),
            cases=tuple(report.get("cases") or ()),
            stderr=proc.stderr,
        )


class _Provider:
    """Builds the checker once per session, on first use, with the build's output shown."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._checker: CdiChecker | None = None
        self._error: CheckerUnavailable | None = None
        self.build_seconds: float | None = None

    def get(self) -> CdiChecker:
        with self._lock:
            if self._checker is None and self._error is None:
                try:
                    self._checker = CdiChecker(self._build())
                except CheckerUnavailable as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error
            assert self._checker is not None
            return self._checker

    def _build(self) -> Path:
        script = CHECKER_DIR / "build.sh"
        if shutil.which("go") is None:
            msg = f"no Go toolchain on PATH to build the CDI checker with {script}"
            raise CheckerUnavailable(msg, go_missing=True)
        capman = self._config.pluginmanager.get_plugin("capturemanager")
        shown = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        t0 = time.monotonic()
        with shown:
            try:
                proc = subprocess.Popen(
                    ["bash", str(script)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            except OSError as exc:
                msg = f"cannot run {script}: {exc}"
                raise CheckerUnavailable(msg) from exc
            assert proc.stderr is not None and proc.stdout is not None
            log: list[str] = []
            for line in proc.stderr:  # shown as it comes: the first build downloads and compiles
                if not log:
                    sys.stderr.write(f"\n[cdicheck] building the CDI checker with {script}\n")
                log.append(line)
                sys.stderr.write(f"[cdicheck] {line}")
                sys.stderr.flush()
            try:
                stdout, _ = proc.communicate(timeout=_BUILD_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.communicate()
                msg = f"building the CDI checker with {script} timed out"
                raise CheckerUnavailable(msg) from exc
            self.build_seconds = time.monotonic() - t0
            if log:
                sys.stderr.write(f"[cdicheck] done in {self.build_seconds:.1f} s\n")
        output = "".join(log)
        if proc.returncode != 0:
            msg = f"building the CDI checker with {script} failed ({proc.returncode}):\n{output}"
            raise CheckerUnavailable(msg)
        lines = stdout.strip().splitlines()
        binary = Path(lines[-1]) if lines else Path()
        if not lines or not os.access(binary, os.X_OK):
            msg = f"{script} printed {stdout!r}, not the path of an executable"
            raise CheckerUnavailable(msg)
        return binary


# --- recording -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Written:
    """One spec as written, its snapshot for the checker and the IDs write returned."""

    spec_path: Path
    content: str
    staged_dir: Path
    device_ids: tuple[str, ...]
    renames: tuple[tuple[str, str], ...]  # (snapshot path, original path), longest first


def _node_signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_mode, st.st_rdev)


def _reproduce(host_path: str, target: Path) -> bool:
    """Make ``target`` what ``lstat(host_path)`` shows now; False when that is not possible."""
    try:
        st = os.lstat(host_path)
    except FileNotFoundError:
        return True  # nothing there: the snapshot has nothing there either
    except OSError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    try:
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(target, stat.S_IFMT(st.st_mode) | mode, st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target, mode)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(host_path), target)
            return True
        elif stat.S_ISREG(st.st_mode):
            target.touch()
        elif stat.S_ISDIR(st.st_mode):
            target.mkdir()
        else:
            return False
        target.chmod(mode)  # mknod and friends are filtered by the umask
    except OSError:
        with contextlib.suppress(OSError):
            target.unlink()
        return False
    return True


def _container_edits(spec: dict[str, Any]) -> list[dict[str, Any]]:
    holders: list[Any] = [spec, *(spec.get("devices") or ())]
    return [
        h["containerEdits"]
        for h in holders
        if isinstance(h, dict) and isinstance(h.get("containerEdits"), dict)
    ]


@dataclass
class _Recorder:
    """The specs written during one test."""

    nodeid: str
    records: list[_Written] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    call_checked: bool = False
    _seen: set[tuple[Any, ...]] = field(default_factory=set)
    _stage: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, specs: CdiSpecs, claim: PreparedClaim, ids: Ids) -> None:
        device_ids = tuple(i for per_device in ids.values() for i in per_device)
        if not device_ids:
            return  # no edits, no spec
        path = specs.spec_path(claim.ref.uid)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return  # removed again by a concurrent unprepare: nothing a runtime could read
        except OSError as exc:
            self.problems.append(f"CDI spec {path}: cannot read it back after writing: {exc}")
            return
        try:
            spec = json.loads(raw)
        except ValueError as exc:
            self.problems.append(f"CDI spec {path}: not valid JSON after writing: {exc}")
            return
        nodes = [
            n
            for edits in _container_edits(spec if isinstance(spec, dict) else {})
            for n in (edits.get("deviceNodes") or ())
            if isinstance(n, dict) and isinstance(n.get("hostPath"), str)
        ]
        key = (str(path), raw, device_ids, tuple(_node_signature(n["hostPath"]) for n in nodes))
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            if self._stage is None:
                self._stage = Path(tempfile.mkdtemp(prefix="dra-cdicheck-"))
            case_dir = self._stage / str(len(self.records))
        spec_dir, node_dir = case_dir / "spec", case_dir / "nodes"
        spec_dir.mkdir(parents=True)
        node_dir.mkdir()
        renames: list[tuple[str, str]] = []
        for i, node in enumerate(nodes):
            original = node["hostPath"]
            snapshot = node_dir / f"{i}-{Path(original).name or 'node'}"
            if _reproduce(original, snapshot):
                node["hostPath"] = str(snapshot)
                renames.append((str(snapshot), original))
        staged = json.dumps(spec, indent=2) + "\n" if renames else raw
        (spec_dir / path.name).write_text(staged, encoding="utf-8")
        renames.append((str(spec_dir / path.name), str(path)))
        renames.append((str(spec_dir), str(path.parent)))
        renames.sort(key=lambda r: len(r[0]), reverse=True)
        written = _Written(path, raw, spec_dir, device_ids, tuple(renames))
        with self._lock:
            self.records.append(written)

    def pending(self) -> list[_Written]:
        with self._lock:
            out = self.records[self.checked :]
            self.checked = len(self.records)
            return out

    def close(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)


def _unmap(text: str, renames: Sequence[tuple[str, str]]) -> str:
    for snapshot, original in renames:
        text = text.replace(snapshot, original)
    return text


def _failure(written: _Written, case: Mapping[str, Any], library: str) -> str:
    lines = [
        f"CDI spec {written.spec_path} written by this test is refused by {library} "
        "(the CDI code containerd and CRI-O run):"
    ]
    for device, error in sorted((case.get("deviceErrors") or {}).items()):
        lines.append(f"  device {device}: {_unmap(str(error), written.renames)}")
    for spec_file, errors in sorted((case.get("specErrors") or {}).items()):
        for error in errors:
            where = _unmap(spec_file, written.renames)
            lines.append(f"  spec {where}: {_unmap(str(error), written.renames)}")
    if not case.get("deviceErrors") and not case.get("specErrors"):
        lines.append(f"  {_unmap(str(case.get('error', '')), written.renames)}")
    lines.append(f"  device IDs returned by CdiSpecs.write: {', '.join(written.device_ids)}")
    content = written.content
    if len(content) > _SPEC_SHOWN:
        content = content[:_SPEC_SHOWN] + "\n  ..."
    lines.append("  the spec as written:")
    lines.extend(f"    {line}" for line in content.rstrip("\n").splitlines())
    return "\n".join(lines)


# --- session state and hooks ---------------------------------------------------------------


@dataclass
class _Session:
    provider: _Provider
    original_write: Any
    current: _Recorder | None = None
    specs_checked: int = 0
    tests_checked: int = 0
    runs: int = 0
    seconds: float = 0.0
    unavailable: str | None = None


_KEY = pytest.StashKey[_Session]()


def pytest_configure(config: pytest.Config) -> None:
    # Registered in pyproject.toml too; registering here keeps the plugin usable on its own.
    config.addinivalue_line("markers", _MARKER_HELP)
    original = CdiSpecs.write
    session = _Session(provider=_Provider(config), original_write=original)
    config.stash[_KEY] = session

    @functools.wraps(original)
    def write(self: CdiSpecs, claim: PreparedClaim) -> _WriteResult:
        ids = original(self, claim)
        recorder = session.current
        if recorder is not None:
            try:
                recorder.record(self, claim, ids)
            except Exception as exc:  # noqa: BLE001 - never break the code under test
                recorder.problems.append(
                    f"CDI spec of claim {claim.ref}: cannot take a copy for the CDI check: {exc!r}"
                )
        return ids

    CdiSpecs.write = write  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_KEY, None)
    if session is not None:
        CdiSpecs.write = session.original_write  # type: ignore[method-assign]


def _check(item: pytest.Item, session: _Session, recorder: _Recorder) -> None:
    problems, recorder.problems = recorder.problems, []
    pending = recorder.pending()
    if not pending and not problems:
        return
    if pending:
        unavailable: CheckerUnavailable | None = None
        try:
            checker = session.provider.get()
        except CheckerUnavailable as exc:
            unavailable = exc
        if unavailable is not None:
            if _in_ci() or not unavailable.go_missing:
                pytest.fail(
                    f"{len(pending)} CDI spec(s) written by this test could not be checked "
                    f"with the CDI library: {unavailable}",
                    pytrace=False,
                )
            session.unavailable = str(unavailable)
            return
        cases = [
            {"name": str(w.spec_path), "specDir": str(w.staged_dir), "devices": list(w.device_ids)}
            for w in pending
        ]
        t0 = time.monotonic()
        try:
            result = checker.check(cases)
        except CheckerUnavailable as exc:
            unavailable = exc
        if unavailable is not None:
            pytest.fail(str(unavailable), pytrace=False)
        session.seconds += time.monotonic() - t0
        session.runs += 1
        session.specs_checked += len(pending)
        session.tests_checked += 1
        if len(result.cases) != len(pending):
            pytest.fail(
                f"the CDI checker answered {len(result.cases)} cases for {len(pending)} specs:\n"
                f"{result.stderr}",
                pytrace=False,
            )
        for written, case in zip(pending, result.cases, strict=True):
            if not case.get("ok"):
                problems.append(_failure(written, case, result.library))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    session = item.config.stash[_KEY]
    if item.get_closest_marker(MARKER) is None:
        session.current = _Recorder(item.nodeid)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield  # the test's own failure propagates from here, and its specs stay unchecked
    session = item.config.stash[_KEY]
    recorder = session.current
    if recorder is not None:
        recorder.call_checked = True
        _check(item, session, recorder)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    session = item.config.stash[_KEY]
    try:
        result = yield
        recorder = session.current
        if recorder is not None and recorder.call_checked:
            _check(item, session, recorder)  # specs written while fixtures were torn down
        return result
    finally:
        if session.current is not None:
            session.current.close()
        session.current = None


@pytest.fixture(scope="session")
def cdi_checker(request: pytest.FixtureRequest) -> CdiChecker:
    """The built CDI checker; skips without a Go toolchain (fails in CI)."""
    try:
        return request.config.stash[_KEY].provider.get()
    except CheckerUnavailable as exc:
        unavailable = exc
    if _in_ci() or not unavailable.go_missing:
        pytest.fail(f"the CDI checker is required: {unavailable}", pytrace=False)
    pytest.skip(str(unavailable))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(_KEY, None)
    if session is None:
        return
    if session.unavailable is not None:
        terminalreporter.write_line(
            "WARNING: CDI specs were NOT checked with the CDI library: "
            + session.unavailable.strip().splitlines()[0],
            yellow=True,
            bold=True,
        )
    if session.runs:
        build = session.provider.build_seconds
        terminalreporter.write_line(
            f"[cdicheck] {session.specs_checked} CDI specs of {session.tests_checked} tests "
            f"checked with the CDI library in {session.seconds:.2f} s "
            f"({1000 * session.seconds / session.runs:.0f} ms per test)"
            + (f", checker provided in {build:.1f} s" if build is not None else "")
        )
