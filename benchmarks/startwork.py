"""The work dra-core does from spawn until its registration socket serves, in instructions.

The wall time of a start varies by half on a shared machine from one minute to the next (the
same start took 137 and 244 ms a minute apart here), the instructions it executes do not:
``valgrind --tool=callgrind`` counts them, the same for the same code and files whatever else
the machine does. ``dra-core run --backend fake --no-publish`` runs under callgrind and exits
the moment its registration server has started, when the kubelet can call GetInfo: once on a
new node (no checkpoint yet) and once restarted (its checkpoint there). The interpreter's own
start (``python -c pass``) is counted too, for scale.

By default dra-core runs as the image installs it (`run.installed_agent`); ``--from-source``
runs the checkout with this interpreter (what a development environment adds shows there).

Usage: ``python3 benchmarks/startwork.py [--from-source] [--json]``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from run import FAKE_AGENT, agent_dirs, compile_bytecode, installed_agent

from dra_core.testing.startup import until_serving


def instructions(argv: Sequence[str], cwd: Path) -> int:
    """Instructions ``argv`` executes, counted by callgrind (all threads)."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        msg = f"{argv[0]} under callgrind failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return int(found.group(1))


def start_command(python: str, root: Path) -> list[str]:
    """``dra-core run --backend fake --no-publish`` with ``python``, its directories below
    ``root``, until its registration server has started."""
    args = [*FAKE_AGENT[3:], "--no-publish", *agent_dirs(root, "startwork")]
    return until_serving(args, python=python)


def measure(python: str, root: Path) -> dict[str, int]:
    """Instructions of the interpreter alone, of a first start and of a restart."""
    run = start_command(python, root)
    return {
        "python_alone": instructions([python, "-c", "pass"], root),
        "first_start": instructions(run, root),
        "restart": instructions(run, root),  # the first left its checkpoint
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from-source",
        action="store_true",
        help="the checkout with this interpreter instead of dra-core installed as the image has it",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("startwork.py: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    if args.from_source:
        compile_bytecode()
        python = sys.executable
    else:
        python = str(Path(installed_agent()[0]).with_name("python"))
    with tempfile.TemporaryDirectory(prefix="dra-startwork-", dir="/tmp") as tmp:
        counts = measure(python, Path(tmp))
    show(counts, "instructions until the registration socket serves", python, as_json=args.json)
    return 0


def show(counts: dict[str, int], heading: str, python: str, *, as_json: bool) -> None:
    """Print instruction counts, as JSON or as a table in millions."""
    if as_json:
        print(json.dumps({"python": python, "instructions": counts}, indent=2))
        return
    print(f"{heading} ({python}):")
    width = max(map(len, counts))
    for key, count in counts.items():
        print(f"  {key.replace('_', ' '):{width}} {count / 1e6:8.2f} M")


if __name__ == "__main__":
    raise SystemExit(main())
