"""Container images for a test node, built locally as OCI image archives.

No registry is reachable from a test machine, so the node's images are made from local
binaries: a one-layer image per program, written as an OCI image layout in a tar archive that
``ctr images import`` loads into containerd. The archives are reproducible (fixed timestamps
and owners), so the same binary gives the same image digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ("Image", "busybox_image", "pause_image", "write_oci_archive")

_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Image:
    """A one-layer image: ``files`` maps a path in the image to a host file (copied) or, for
    a string starting with ``->``, a symlink target."""

    name: str
    files: dict[str, Path | str]
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = field(default=("PATH=/bin",))


def pause_image(pause: Path, name: str) -> Image:
    return Image(name=name, files={"pause": pause}, entrypoint=("/pause",))


def busybox_image(busybox: Path, name: str) -> Image:
    """busybox with a ``/bin`` link for each of its applets, so ``sh``, ``ls`` ... work."""
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    files: dict[str, Path | str] = {"bin/busybox": busybox}
    files.update({f"bin/{a}": "->busybox" for a in applets if a != "busybox"})
    return Image(name=name, files=files, cmd=("sh",))


def _layer(files: dict[str, Path | str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, source in sorted(files.items()):
            info = tarfile.TarInfo(path)
            if isinstance(source, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, source[2:], 0o777
                tar.addfile(info)
            else:
                data = source.read_bytes()
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_archive(image: Image, path: Path) -> str:
    """Write ``image`` as an OCI image layout archive at ``path``; return the manifest digest."""
    layer = _layer(image.files)
    layer_gz = gzip.compress(layer, mtime=0)
    config_body: dict[str, object] = {"Env": list(image.env)}
    if image.entrypoint:
        config_body["Entrypoint"] = list(image.entrypoint)
    if image.cmd:
        config_body["Cmd"] = list(image.cmd)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config_body,
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "config": {"mediaType": _CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": _LAYER, "digest": _digest(layer_gz), "size": len(layer_gz)}],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": _MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": image.name,
                        "org.opencontainers.image.ref.name": image.name.rpartition(":")[2],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    entries = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": index,
        **{f"blobs/sha256/{_digest(b)[7:]}": b for b in (layer_gz, config, manifest)},
    }
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return _digest(manifest)
