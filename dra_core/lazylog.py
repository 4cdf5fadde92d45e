"""loguru's logger, imported when it is first used.

loguru imports asyncio, ssl and multiprocessing: about a fifth of the work an agent does before
its kubelet sockets serve. An agent restarted on a node logs nothing before then, so the
import waits for the first message (``serving the kubelet: ...``), which comes once the
kubelet can already register. ``logger`` here is loguru's own logger for every use (``bind``,
``opt``, ``add`` and the rest); the set-up `dra_core.logs.configure_logging` asks for is
applied when loguru is loaded, before any message is written.

A backend logs with ``from dra_core import logger``; one that imports loguru itself gets the
same logger, and the agent applies the set-up once it has loaded the backend (`settle`).

Do not log from a signal handler: Python runs it in the main thread, which may be loading
loguru under this module's lock at that moment, and the message would wait for it forever.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ("configure", "logger", "settle")

Setup = Callable[["Logger"], None]

_lock = threading.Lock()
_loaded: Logger | None = None
_pending: Setup | None = None


def _load() -> Logger:
    """loguru's logger, with the pending set-up applied (once, under the lock)."""
    global _loaded, _pending
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            from loguru import logger as loaded

            if _pending is not None:
                _pending(loaded)
                _pending = None
            _loaded = loaded
        return _loaded


class _Deferred:
    """Stands for loguru's logger and hands every attribute over to it, loading it first."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(_load(), name)

    def __repr__(self) -> str:
        return "<loguru logger, loaded when first used>" if _loaded is None else repr(_loaded)


logger = cast("Logger", _Deferred())


def configure(setup: Setup) -> None:
    """Apply ``setup`` to loguru's logger: now if loguru is loaded, else when it is (a later
    call replaces a set-up not yet applied)."""
    global _pending
    with _lock:
        loaded = _loaded
        if loaded is None:
            _pending = setup
    if loaded is None:
        settle()  # loguru imported elsewhere (a backend's own import): apply it now
    else:
        setup(loaded)


def settle() -> None:
    """Apply a pending set-up if something imported loguru itself (a backend or a library), so
    that its messages take the configured format from the first."""
    if _loaded is None and "loguru" in sys.modules:
        _load()
