"""The control plane never imports torch: it validates adapter folders and fingerprints
base models with the torch-free `engine.formats`, the same code the engine loads with,
so it starts in a fraction of the time and needs no accelerator stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Run in a fresh interpreter (this one has torch loaded): import every module of the
# package named by argv[1], failing at the first one that brings torch with it.
IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
    assert "torch" not in sys.modules, f"importing {name} imported torch"
print(len(names))
"""


@pytest.mark.parametrize(("package", "at_least"), [("control_plane", 30), ("engine.formats", 7)])
def test_no_module_imports_torch(package: str, at_least: int) -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE, package],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= at_least  # the walk found the package's modules
