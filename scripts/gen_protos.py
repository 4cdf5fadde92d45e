"""Regenerate the committed protobuf and gRPC code of ``dra_core/kubelet/proto``.

Usage::

    python scripts/gen_protos.py           # rewrite the generated files in place
    python scripts/gen_protos.py --check   # exit 1 naming the stale files, change nothing

The generators are pinned (the ``proto`` extra: ``pip install -e '.[proto]'``) so that
regenerating reproduces the committed files byte for byte. protoc runs with ``-I <repo root>``
so that generated imports read ``from dra_core.kubelet.proto import ...``.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["PINNED", "PROTO_DIR", "REPO_ROOT", "check", "generate", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "dra_core" / "kubelet" / "proto"
#: Distribution name -> exact version the committed code was generated with.
PINNED = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class GenerationError(RuntimeError):
    """The generators are missing, have the wrong version, or protoc failed."""


def _check_pins() -> None:
    problems = []
    for dist, want in PINNED.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed (want {want})")
            continue
        if have != want:
            problems.append(f"{dist} is {have}, want {want}")
    if problems:
        msg = (
            "cannot regenerate the kubelet protos: "
            + "; ".join(problems)
            + ". Install the pinned generators: pip install "
            + " ".join(f"{d}=={v}" for d, v in PINNED.items())
        )
        raise GenerationError(msg)


def _mypy_plugins() -> list[str]:
    """``--plugin`` arguments for the mypy-protobuf generators, found beside this Python."""
    args = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        candidate = Path(sys.executable).parent / name
        found = str(candidate) if candidate.exists() else shutil.which(name)
        if found is None:
            msg = f"{name} not found beside {sys.executable} or on PATH; install mypy-protobuf"
            raise GenerationError(msg)
        args.append(f"--plugin={name}={found}")
    return args


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every ``.proto`` of PROTO_DIR, writing under ``out_root``.

    Returns the generated files, as paths relative to ``out_root`` (which mirror the repo).
    """
    _check_pins()
    from grpc_tools import protoc  # imported late: only the proto extra provides it

    include = Path(protoc.__file__).parent / "_proto"
    protos = sorted(p.relative_to(REPO_ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        msg = f"no .proto files in {PROTO_DIR}"
        raise GenerationError(msg)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        *_mypy_plugins(),
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    status = protoc.main(args)
    if status != 0:
        msg = f"protoc failed with status {status} on {', '.join(protos)} (see its output above)"
        raise GenerationError(msg)
    return sorted(p.relative_to(out_root) for p in out_root.rglob("*") if p.is_file())


def _committed() -> set[Path]:
    return {
        p.relative_to(REPO_ROOT)
        for p in PROTO_DIR.iterdir()
        if p.is_file() and p.name.endswith(_GENERATED_SUFFIXES)
    }


def check() -> list[str]:
    """Regenerate into a temporary directory; return the stale, missing or extra files."""
    with tempfile.TemporaryDirectory(prefix="dra-protos-") as tmp:
        out_root = Path(tmp)
        fresh = generate(out_root)
        problems = []
        for rel in fresh:
            committed = REPO_ROOT / rel
            if not committed.exists():
                problems.append(f"{rel}: missing")
            elif not filecmp.cmp(out_root / rel, committed, shallow=False):
                problems.append(f"{rel}: stale")
        problems.extend(
            f"{rel}: not generated from any .proto" for rel in sorted(_committed() - set(fresh))
        )
        return problems


def write() -> list[Path]:
    """Regenerate in place, removing generated files no ``.proto`` produces any more."""
    with tempfile.TemporaryDirectory(prefix="dra-protos-") as tmp:
        out_root = Path(tmp)
        fresh = generate(out_root)
        for rel in _committed() - set(fresh):
            (REPO_ROOT / rel).unlink()
        for rel in fresh:
            shutil.copyfile(out_root / rel, REPO_ROOT / rel)
        return fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="report stale generated files and exit 1 if any"
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check()
            if problems:
                print("generated kubelet proto code is out of date:", file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                print("regenerate with: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("generated kubelet proto code is up to date")
            return 0
        for rel in write():
            print(f"wrote {rel}")
        return 0
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
