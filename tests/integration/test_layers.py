"""The import-linter contracts in pyproject.toml catch an import that breaks the layers: run on a copy of the
package with one such import added, lint-imports reports the contract BROKEN and exits 1."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is not installed (pip install 'mbv2train[dev]')")

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
LAYERS = "Packages import only their own or lower layers"
LEAVES = "The leaf modules at the top of mbv2train import no package"


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts, on the package copied under ``project``."""
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, "-c", command, "--no-cache", "--no-logo"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path):
    shutil.copytree(ROOT / "mbv2train", tmp_path / "mbv2train", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_as_it_is_keeps_every_contract(project):
    result = lint_imports(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{LAYERS} KEPT" in result.stdout and f"{LEAVES} KEPT" in result.stdout
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("model/network.py", "from mbv2train.cli import app", LAYERS),  # a lower layer imports the CLI
    ("config/settings.py", "from mbv2train.train import trainer", LAYERS),  # the bottom layer imports upward
    ("data/folders.py", "from mbv2train.model import MobileNetV2", LAYERS),  # data and model: independent
    ("model/network.py", "from mbv2train.data import folders", LAYERS),
    ("words.py", "from mbv2train.cli import app", LEAVES),  # a leaf imports a package
])
def test_an_import_against_the_layers_breaks_its_contract(project, module, line, contract):
    path = project / "mbv2train" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract} BROKEN" in result.stdout
    # the report names the module that imports against the layers
    assert "mbv2train." + module.removesuffix(".py").replace("/", ".") in result.stdout
