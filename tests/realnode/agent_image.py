"""The agent's container image, built from deploy/Dockerfile without a Docker engine or registry.

Buildah builds the repository's own Dockerfile; what differs from a user's build is only what
a machine without a registry needs: the base is a Debian root file system made by debootstrap
(``BASE`` build argument) and pip installs from wheels prepared on the host
(``PIP_INSTALL_OPTIONS``). The base's root file system, the wheels and the built image are
cached (``~/.cache/dra-core/image`` and buildah's storage): the image is rebuilt only when the
sources it is built from change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dra-core" / "image"
BASE_IMAGE = "localhost/dra-core-test-base:bookworm"
IMAGE_REPOSITORY = "localhost/dra-core"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OFFLINE = "--no-index --find-links /src/deploy/image/wheels"
#: What deploy/Dockerfile copies from the build context.
CONTEXT = ("pyproject.toml", "README.md", "LICENSE", "dra_core", "backends/fake", "backends/i915")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "tests", ".*_cache")


class ImageUnavailable(Exception):
    """The image cannot be built on this machine (no buildah, no debootstrap, no network)."""


@dataclass(frozen=True)
class AgentImage:
    name: str
    archive: Path  # OCI image archive for ``ctr images import``
    size: int  # bytes, as buildah reports it


def _run(*argv: str, timeout: float = 900) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        msg = f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}"
        raise ImageUnavailable(msg)
    return proc.stdout


def _image_exists(name: str) -> bool:
    inspect = ["buildah", "inspect", "--type", "image", name]
    return subprocess.run(inspect, capture_output=True).returncode == 0


def ensure_base(say=print) -> str:
    """The Debian base with Python in buildah's storage, made with debootstrap once."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            msg = f"{tool} is not installed (Debian package {tool}; .ci/run installs it)"
            raise ImageUnavailable(msg)
    if _image_exists(BASE_IMAGE):
        return BASE_IMAGE
    archive = CACHE / "base-rootfs.tar"
    if not archive.exists():
        say("[image] making a Debian base with debootstrap (about two minutes, once)")
        work = Path(tempfile.mkdtemp(prefix="dra-image-base-"))
        try:
            rootfs = work / "rootfs"
            _run(
                "debootstrap", "--variant=minbase", "--include=python3-minimal,python3-venv",
                "bookworm", str(rootfs), "http://deb.debian.org/debian",
            )  # fmt: skip
            # What a container never uses: package caches, manuals, translations.
            for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/man", "usr/share/locale"):
                shutil.rmtree(rootfs / junk, ignore_errors=True)
            CACHE.mkdir(parents=True, exist_ok=True)
            partial = archive.with_suffix(".partial")
            _run("tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), ".")
            partial.replace(archive)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    container = _run("buildah", "from", "scratch").strip()
    try:
        _run("buildah", "add", "--quiet", container, str(archive), "/")
        _run("buildah", "config", "--env", f"PATH={_PATH}", container)
        _run("buildah", "commit", "--quiet", container, BASE_IMAGE)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    return BASE_IMAGE


def _source_digest() -> str:
    """A digest of everything the image is built from, so an unchanged tree reuses the image."""
    digest = hashlib.sha256()
    files = [REPO / "deploy" / "Dockerfile", *sorted((REPO / "deploy" / "image").rglob("*"))]
    for entry in CONTEXT:
        path = REPO / entry
        files.extend(sorted(path.rglob("*")) if path.is_dir() else [path])
    for path in files:
        parts = path.relative_to(REPO).parts
        if not path.is_file() or "__pycache__" in parts or "tests" in parts:
            continue
        if any(p.endswith(".egg-info") or p.endswith("_cache") for p in parts):
            continue
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _wheels(into: Path) -> None:
    """Wheels of the three distributions, their dependencies and the build back-end."""
    into.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    sources = (str(REPO), str(REPO / "backends/fake"), str(REPO / "backends/i915"))
    _run(*pip, "wheel", "--wheel-dir", str(into), *sources)
    _run(*pip, "download", "--only-binary=:all:", "--dest", str(into), "setuptools>=65", "wheel")


#: Builds of other source trees are kept this long: another checkout's test run may still be
#: importing them (the cache is shared by every tree on the machine).
_KEEP_SECONDS = 6 * 3600


def _forget_older_builds() -> None:
    """Remove images and archives of earlier source trees, so the cache does not grow."""
    for archive in CACHE.glob("dra-core-*.tar"):
        if time.time() - archive.stat().st_mtime < _KEEP_SECONDS:
            continue
        archive.unlink(missing_ok=True)
        tag = archive.name.removeprefix("dra-core-").removesuffix(".tar")
        subprocess.run(["buildah", "rmi", f"{IMAGE_REPOSITORY}:{tag}"], capture_output=True)


def build_agent_image(say=print) -> AgentImage:
    """Build (or reuse) the agent image and export it as an OCI archive."""
    base = ensure_base(say)
    tag = _source_digest()
    name = f"{IMAGE_REPOSITORY}:{tag}"
    archive = CACHE / f"dra-core-{tag}.tar"
    if not _image_exists(name):
        _forget_older_builds()
        say(f"[image] building {name} from deploy/Dockerfile with buildah")
        context = Path(tempfile.mkdtemp(prefix="dra-image-context-"))
        try:
            for entry in (*CONTEXT, "deploy/image", "deploy/Dockerfile", ".dockerignore"):
                source, target = REPO / entry, context / entry
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, target, ignore=_IGNORED)
                else:
                    shutil.copy2(source, target)
            _wheels(context / "deploy" / "image" / "wheels")
            _run(
                "buildah", "bud", "--quiet", "--isolation", "chroot",
                "--layers=false", "-f", str(context / "deploy" / "Dockerfile"),
                "--build-arg", f"BASE={base}",
                "--build-arg", f"PIP_INSTALL_OPTIONS={_OFFLINE}",
                "-t", name, str(context),
            )  # fmt: skip
        finally:
            shutil.rmtree(context, ignore_errors=True)
    if not archive.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        _run("buildah", "push", "--quiet", name, f"oci-archive:{partial}:{name}")
        partial.replace(archive)
    info = json.loads(_run("buildah", "inspect", "--type", "image", name))
    size = sum(int(layer.get("size", 0)) for layer in info["OCIv1"].get("layers", []) or ())
    return AgentImage(name=name, archive=archive, size=size or archive.stat().st_size)


def config(image: AgentImage) -> dict:
    """The OCI image configuration (entrypoint, user, environment)."""
    info = json.loads(_run("buildah", "inspect", "--type", "image", image.name))
    return info["OCIv1"]["config"]


class Mounted:
    """The image's root file system, mounted read-only for inspection."""

    def __init__(self, image: AgentImage) -> None:
        self.image = image
        self.container = ""

    def __enter__(self) -> Path:
        self.container = _run("buildah", "from", "--pull-never", self.image.name).strip()
        return Path(_run("buildah", "mount", self.container).strip())

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["buildah", "umount", self.container], capture_output=True)
        subprocess.run(["buildah", "rm", self.container], capture_output=True)


def retag(image: AgentImage, tag: str) -> AgentImage:
    """The same image under another tag, exported as its own OCI archive (as a new release of
    the agent would be)."""
    name = f"{IMAGE_REPOSITORY}:{tag}"
    _run("buildah", "tag", image.name, name)
    archive = CACHE / f"dra-core-{tag}.tar"
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    _run("buildah", "push", "--quiet", name, f"oci-archive:{partial}:{name}")
    partial.replace(archive)
    return AgentImage(name=name, archive=archive, size=image.size)
