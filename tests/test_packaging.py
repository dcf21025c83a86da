"""`pip install .` puts one namespace, sparsec, into site-packages (passes/runtime/models inside)."""

import subprocess
import sys
import zipfile

import pytest

from tests.test_readme import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (path,) = out.glob("sparsec-*.whl")
    return path


@pytest.mark.integration
def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"sparsec", "sparsec-0.1.0.dist-info"}
    for module in ("sparsec/cli.py", "sparsec/passes/nm_prune.py", "sparsec/passes/patterns.py",
                   "sparsec/runtime/session.py", "sparsec/models/zoo.py"):
        assert module in names
    assert not any(n.startswith(("tests/", "passes/", "runtime/", "models/")) for n in names)


@pytest.mark.integration
def test_installed_wheel_imports_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import sparsec, sparsec.passes, sparsec.runtime.session, sparsec.models;"
            "from sparsec.pipeline import registry; print(sparsec.__file__); print(sorted(registry()))")
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(target)) and "'nm'" in proc.stdout
