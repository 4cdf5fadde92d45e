"""Copy the licence notices of every installed distribution into one directory.

Run with the image's Python after installing: ``python3 collect-licenses.py DIR``. Each
distribution gets ``DIR/<name>-<version>/`` with its licence files, and ``DIR/INDEX`` lists
every distribution with its declared licence, so that a distribution without a licence file
is still accounted for.
"""

from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

_NOTICE = re.compile(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)


def _declared(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 80:
        return text
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if "License" in c]
    return ", ".join(classifiers) or "see the licence files"


def collect(target: Path) -> list[str]:
    """Copy the notices into ``target``; the index lines, one per distribution."""
    index = []
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        name, version = dist.metadata["Name"], dist.version
        copied = 0
        for file in dist.files or ():
            if ".dist-info" not in str(file) or not _NOTICE.search(file.name):
                continue
            source = Path(str(dist.locate_file(file)))
            if not source.is_file():
                continue
            # Keep the path below the dist-info directory: two files may share a name.
            inside = Path(*file.parts[1:]) if len(file.parts) > 1 else Path(file.name)
            destination = target / f"{name}-{version}" / inside
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            copied += 1
        index.append(f"{name} {version}: {_declared(dist)} ({copied} licence files)")
    (target / "INDEX").write_text("\n".join(index) + "\n", encoding="utf-8")
    return index


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: collect-licenses.py TARGET_DIR")
    directory = Path(sys.argv[1])
    directory.mkdir(parents=True, exist_ok=True)
    print("\n".join(collect(directory)))
