"""Install throw-away distributions with entry points into a directory, for loader tests.

A real ``*.dist-info`` directory on ``sys.path`` (through PYTHONPATH in a subprocess) is what
``importlib.metadata`` reads in production too, so the loader is tested without mocks.
"""

from __future__ import annotations

from pathlib import Path


def make_distribution(
    site: Path,
    name: str,
    version: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str],
) -> Path:
    """Write modules and a dist-info declaring ``entry_points`` into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{ep} = {value}" for ep, value in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info
