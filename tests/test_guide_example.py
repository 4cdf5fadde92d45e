"""The backend guide's example (examples/widget-backend) is what the guide shows, installs with
pip, runs in `dra-core demo` and passes the conformance suite of dra_core.testing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dra_core.testing.conformance import BackendConformance

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "widget-backend"
GUIDE = ROOT / "docs" / "backend-guide.md"


def test_the_guide_shows_the_example_files_as_they_are():
    blocks = dict(re.findall(r"```\w+\n# (\S+)\n(.*?)```", GUIDE.read_text(), re.DOTALL))
    for name in ("widget_backend.py", "pyproject.toml"):
        assert blocks.get(name) == (EXAMPLE / name).read_text(), f"the guide's {name} drifted"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example installed with pip into a directory of its own, on PYTHONPATH for the
    dra-core processes the tests start (entry points come from its installed metadata)."""
    target = tmp_path_factory.mktemp("widget-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        check=True,
        timeout=300,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
        yield target


@pytest.mark.controlplane
def test_the_example_runs_in_the_demo(installed: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dra_core", "demo", "--backend", "widget"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "published 2 devices" in done.stdout
    assert '"WIDGET=widget-' in done.stdout, "the CDI spec does not carry the example's env"


class TestWidgetConformance(BackendConformance):
    backend = "widget"

    @pytest.fixture(scope="class")
    @classmethod
    def backend_args(cls, installed: Path) -> Sequence[str]:
        return ()
