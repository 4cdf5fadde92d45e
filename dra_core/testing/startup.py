"""An agent's start up to the moment the kubelet can register its driver, on its own.

`until_serving` gives the command that runs ``dra-core ARGS`` in a new interpreter and exits
once the agent's registration server has started, optionally printing first which of some
modules were imported by then: what a backend's import adds to a start, or whether a module
stays off the start path, can be checked with it (dra-core's own tests do both), and
``benchmarks/startwork.py`` counts the instructions of that run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

__all__ = ("until_serving",)

#: ``python -c PROGRAM MODULES ARGS...``: runs ``dra-core ARGS``; once the registration server
#: has started, prints as a JSON list which of the comma-separated MODULES (none when empty)
#: are imported, and exits with 0.
_PROGRAM = """
import json, os, sys
from dra_core.kubelet import grpcserver

watched = [name for name in sys.argv[1].split(",") if name]
serve = grpcserver.GrpcServer.start

def start(server):
    serve(server)
    if server._name == "registration":
        if watched:
            print(json.dumps(sorted(set(watched) & set(sys.modules))), flush=True)
        os._exit(0)

grpcserver.GrpcServer.start = start
from dra_core.cli import main
sys.exit(main(sys.argv[2:]))
"""


def until_serving(
    args: Sequence[str], *, python: str = sys.executable, report: Iterable[str] = ()
) -> list[str]:
    """The command that runs ``dra-core`` with ``args`` (``run ...``) until it serves the
    kubelet's registration socket; with ``report``, it prints which of those modules it
    imported by then (a JSON list on stdout). It exits with 0 once serving, and as
    ``dra-core`` would when it stops before."""
    return [python, "-c", _PROGRAM, ",".join(report), *args]
