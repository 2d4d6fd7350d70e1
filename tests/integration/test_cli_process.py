"""The CLI started as a process: python -m, the console script, and what it imports before torch."""

import subprocess
import sys

from mbv2train import __version__


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_help_and_config_errors_do_not_import_torch():
    # Importing torch takes seconds; `mbv2 --help` and a config mistake must answer without it.
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mbv2train.cli import app\n"
        "runner = CliRunner()\n"
        "assert runner.invoke(app, ['--help']).exit_code == 0\n"
        "assert runner.invoke(app, ['summary', '--help']).exit_code == 0\n"
        "assert runner.invoke(app, ['summary', '--set', 'model.width_mult=0']).exit_code == 2\n"
        "print('torch' in sys.modules)\n"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_python_dash_m_runs_the_same_cli():
    result = run("-m", "mbv2train", "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mbv2train {__version__}"


def test_console_script_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width_mult: -1\n")
    result = run("-m", "mbv2train", "summary", "--config", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {bad}: model.width_mult: must be > 0, got -1.0"
