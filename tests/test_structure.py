"""The package structure: serving cannot reach torch, by construction and in fact."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING_ONLY = ("torch", "transformers", "sklearn", "adapters.training")
# Packages the serving workers import. refit/cli.py is the command line: it reaches training
# lazily, inside the `train` command, and serving never imports it.
SERVING_SIDE = ["service", "adapters/serving", "monitoring", "refit"]
NOT_SERVING = {Path("refit/cli.py")}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def serving_modules() -> list[Path]:
    files = [p for folder in SERVING_SIDE for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if p.relative_to(ROOT) not in NOT_SERVING]


@pytest.mark.parametrize("path", serving_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_serving_side_never_imports_training_code(path):
    bad = sorted(
        name for name in imported_modules(path)
        if any(name == banned or name.startswith(banned + ".") for banned in TRAINING_ONLY)
    )
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: serving must stay torch-free"


def test_importing_the_service_leaves_torch_unloaded(tmp_path):
    code = (
        "import sys\n"
        "import service.app\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})\n"
        "trained = sorted(m for m in sys.modules if m.startswith('adapters.training'))\n"
        "print(loaded, trained)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={"PATH": "/usr/bin:/bin", "REFIT_REGISTRY_PATH": str(tmp_path / "registry"),
             "REFIT_DATA_DIR": str(tmp_path / "var"), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[] []", result.stdout
