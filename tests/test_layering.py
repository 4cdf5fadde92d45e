"""The architecture's import rules (.importlinter) hold: layers, a pure model, the core never
importing a backend, and backends using only the public facade."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "import-linter is part of the lint extra: pip install -e '.[dev]'"
    result = subprocess.run(
        [lint_imports, "--config", str(ROOT / ".importlinter")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
