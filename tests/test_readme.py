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


@pytest.mark.integration
def test_readme_commands_run(tmp_path):
    commands = sh_commands()
    assert any(c.startswith("sparsec demo") for c, _ in commands)
    assert any(c.startswith("sparsec compile") for c, _ in commands)
    for command, expected in commands:
        argv = [sys.executable, "-m", "sparsec", *shlex.split(command)[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expected, f"{command}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
    assert (tmp_path / "sparsec-demo" / "minilm.sparse.onnx").exists()
