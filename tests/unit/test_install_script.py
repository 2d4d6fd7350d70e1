"""scripts/install_venv.py: pip's configured sources reach uv, and the install commands are right."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SCRIPT = REPO / "scripts" / "install_venv.py"


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("install_venv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parses_pip_config_list_output(installer):
    listing = (
        ":env:.default-timeout='180'\n"
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'\n"
        "global.find-links='/opt/wheels'\n"
        "global.constraint='/etc/pip/constraints.txt'\n"
        "not a config line\n"
    )
    config = installer.parse_pip_config(listing)
    assert config == {
        "default-timeout": "180",
        "extra-index-url": "file:///opt/a/simple file:///opt/b/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/pip/constraints.txt",
    }


def test_environment_beats_install_section_beats_global(installer):
    # pip lists sections alphabetically, not by priority: the order of lines must not decide.
    listing = (
        ":env:.index-url='https://env.example/simple'\n"
        "global.index-url='https://global.example/simple'\n"
        "install.index-url='https://install.example/simple'\n"
        "global.find-links='/from/global'\n"
        "install.find-links='/from/install'\n"
    )
    config = installer.parse_pip_config(listing)
    assert config["index-url"] == "https://env.example/simple"
    assert config["find-links"] == "/from/install"


def test_pip_sources_become_uv_options(installer):
    config = {
        "index-url": "https://mirror.example/simple",
        "extra-index-url": "file:///opt/a/simple\nfile:///opt/b/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/pip/constraints.txt",
        "cert": "/etc/ssl/certs/ca.crt",
        "default-timeout": "180",
    }
    options = installer.uv_options_from_pip_config(config)
    assert options == [
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "file:///opt/a/simple",
        "--extra-index-url", "file:///opt/b/simple",
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/pip/constraints.txt",
        "--index-strategy", "unsafe-best-match",
    ]


def test_no_pip_config_gives_uv_defaults(installer):
    assert installer.uv_options_from_pip_config({}) == []
    assert installer.uv_options_from_pip_config({"no-index": "true", "find-links": "/w"}) == [
        "--find-links", "/w", "--no-index", "--index-strategy", "unsafe-best-match"]


def test_install_commands(installer):
    reqs = installer.requirements("torch==2.14.1 torchvision==0.29.1", "dev,demo")
    assert reqs[:2] == ["torch==2.14.1", "torchvision==0.29.1"]
    assert reqs[2] == "-e" and reqs[3].endswith("[dev,demo]")
    assert Path(reqs[3].split("[")[0]) == SCRIPT.parent.parent

    uv = installer.uv_install_command("/v/bin/python", reqs, {"find-links": "/w"}, compile_bytecode=True)
    assert uv[:3] == ["/v/bin/python", "-m", "uv"]
    assert uv[uv.index("--python") + 1] == "/v/bin/python"
    assert "--compile-bytecode" in uv and uv[-4:] == reqs
    assert "--compile-bytecode" not in installer.uv_install_command("/v/bin/python", reqs, {}, False)

    pip = installer.pip_install_command("/v/bin/python", reqs, compile_bytecode=False)
    assert pip[:4] == ["/v/bin/python", "-m", "pip", "install"]
    assert "--no-compile" in pip and pip[-4:] == reqs
    assert "--no-compile" not in installer.pip_install_command("/v/bin/python", reqs, True)


def test_torch_spec_may_carry_options(installer):
    reqs = installer.requirements("torch torchvision --index-url https://download.pytorch.org/whl/cpu", "")
    assert reqs[:4] == ["torch", "torchvision", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert reqs[-1] == str(SCRIPT.parent.parent)


def test_refuses_a_python_outside_a_virtual_environment(tmp_path):
    # The base interpreter behind this venv: installing into it would change the user's own Python.
    base_python = Path(sys.base_prefix) / "bin" / Path(sys.executable).name
    if not base_python.exists() or sys.prefix == sys.base_prefix:
        pytest.skip("needs the tests to run inside a virtual environment")
    result = subprocess.run([str(base_python), str(SCRIPT), "--extras", "dev"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "not a virtual environment" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("failing, expected_tools", [
    ("nothing", ["pip-uv", "uv"]),             # uv installs everything
    ("pip-uv", ["pip-uv", "pip"]),             # uv cannot be installed: pip does the install
    ("uv", ["pip-uv", "uv", "pip"]),           # uv fails: pip does the install
])
def test_auto_falls_back_to_pip(installer, monkeypatch, capsys, failing, expected_tools):
    ran = []

    def tool_of(command):
        if command[2] == "uv":
            return "uv"
        return "pip-uv" if any(arg.startswith("uv") for arg in command) else "pip"

    def fake_run(command):
        ran.append(tool_of(command))
        return 1 if ran[-1] == failing else 0

    monkeypatch.setattr(installer, "_run", fake_run)
    monkeypatch.setattr(installer, "_pip_config_listing", lambda python: "")
    assert installer.install("auto", "torch", "demo", compile_bytecode=False) == 0
    assert ran == expected_tools
    if failing != "nothing":
        assert "installing with pip instead" in capsys.readouterr().err


def test_uv_only_reports_failure_instead_of_falling_back(installer, monkeypatch, capsys):
    monkeypatch.setattr(installer, "_run", lambda command: 1 if command[2] == "uv" else 0)
    monkeypatch.setattr(installer, "_pip_config_listing", lambda python: "")
    assert installer.install("uv", "torch", "demo", compile_bytecode=False) == 1
    assert "error: uv could not install the packages" in capsys.readouterr().err
