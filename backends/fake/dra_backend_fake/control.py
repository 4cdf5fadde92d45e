"""The control file: change the fake inventory, its health and inject failures while running.

A YAML file (``--control-file``, env ``DRA_FAKE_CONTROL``) that the backend re-reads when its
modification time, size or inode changes (every discovery and health check, and from a
background thread that asks the agent to rediscover)::

    add:                      # devices, same schema as the inventory's devices
      - {name: hot-0, capacity: {memory: 2Gi}}
    remove: [dev-3, big-0]    # configured device names (a partitioned device goes whole)
                              # or single published names (big-0-p2)
    unhealthy:                # reported by dra_device_health; delete the entry to recover
      dev-1: fan on fire
      dev-2: {message: gone, effect: NoExecute}
    failPrepare:   {dev-0: injected failure}    # until removed
    failUnprepare: {dev-0: injected failure}    # until removed
    hangPrepare:   {dev-0: 20}                  # seconds, every prepare, until removed

A missing (or deleted) file means no changes. The file is one document, applied whole or not
at all: an invalid file (bad YAML or a bad field, a device that clashes or breaks the
ResourceSlice rules, a FIFO or device in its place, more than :data:`MAX_BYTES`) is logged as
an error naming the file and the problem, and the previous state is kept, every device of it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from dra_backend_fake.files import load_yaml_file
from dra_backend_fake.schema import ControlSpec
from dra_core import describe_validation_error, logger

__all__ = (
    "MAX_BYTES",
    "ControlError",
    "ControlFile",
    "ControlState",
    "parse_control",
    "summary",
    "watch",
)

#: The most bytes read of a control file; a larger one is refused as a whole.
MAX_BYTES: Final = 1 << 20


class ControlError(ValueError):
    """The control file's content is invalid; the message names the file and field."""


@dataclass(frozen=True)
class ControlState:
    """A successfully read control file (or none: every field empty)."""

    spec: ControlSpec
    #: The (mtime_ns, size, inode) it was read at; None when there was no file.
    stamp: tuple[int, int, int] | None = None


def parse_control(data: object, source: str) -> ControlSpec:
    """Decode control-file content strictly; ControlError names ``source`` and the field."""
    if data is None:
        return ControlSpec()
    try:
        return ControlSpec.model_validate(data)
    except ValidationError as exc:
        msg = f"control file {source}: {describe_validation_error(exc)}"
        raise ControlError(msg) from None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ControlFile:
    """A watched control file; :meth:`poll` re-reads it when it changed.

    ``check`` vets a new spec against the rest of the configuration (e.g. added names that
    clash with the inventory) and raises ValueError to reject it.
    """

    def __init__(self, path: Path, check: Callable[[ControlSpec], object] | None = None) -> None:
        self.path = path
        self._check = check
        self._lock = threading.Lock()
        self._state = ControlState(ControlSpec())
        #: The stamp last looked at, read successfully or not (so a bad file is reported once).
        self._seen: tuple[int, int, int] | None = None
        self._first = True

    @property
    def spec(self) -> ControlSpec:
        """The last valid control spec."""
        return self._state.spec

    def poll(self) -> bool:
        """Re-read the file if it changed; True when the effective spec changed."""
        with self._lock:
            stamp = _stamp(self.path)
            if stamp == self._seen and not self._first:
                return False
            self._first = False
            self._seen = stamp
            if stamp is None:
                changed = self._state.spec != ControlSpec()
                if changed:
                    logger.info("control file {} is gone: no more changes in effect", self.path)
                self._state = ControlState(ControlSpec())
                return changed
            try:
                spec = self._read()
            except (ControlError, ValueError) as exc:
                logger.error("{}; keeping the previous control state", exc)
                return False
            changed = spec != self._state.spec
            self._state = ControlState(spec, stamp)
            if changed:
                logger.info("control file {} read: {}", self.path, summary(spec))
            return changed

    def _read(self) -> ControlSpec:
        try:
            data = load_yaml_file(self.path, "control file", MAX_BYTES, ControlError)
        except FileNotFoundError:
            return ControlSpec()
        spec = parse_control(data, str(self.path))
        if self._check is not None:
            try:
                self._check(spec)
            except ValueError as exc:
                msg = f"control file {self.path}: {exc}"
                raise ControlError(msg) from None
        return spec


def summary(spec: ControlSpec) -> str:
    """A short description of what a control spec changes, for the log."""
    parts = []
    if spec.add:
        parts.append(f"add {', '.join(d.name for d in spec.add)}")
    for name in ("remove", "unhealthy", "failPrepare", "failUnprepare", "hangPrepare"):
        value = getattr(spec, name)
        if value:
            parts.append(f"{name} {', '.join(value)}")
    return "; ".join(parts) or "no changes"


def watch(
    control: ControlFile,
    on_change: Callable[[], None],
    stop: threading.Event,
    interval: float,
) -> threading.Thread:
    """Start a daemon thread calling ``on_change`` whenever the control file changes."""

    def run() -> None:
        while not stop.wait(interval):
            try:
                if control.poll():
                    on_change()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                logger.exception("watching control file {} failed; retrying", control.path)

    thread = threading.Thread(target=run, name=f"fake-control-{os.getpid()}", daemon=True)
    thread.start()
    return thread
