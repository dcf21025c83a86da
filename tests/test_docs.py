"""The docs say what the code does: option tables, troubleshooting messages, one page per pass."""

import re
import subprocess
import sys

import pytest

from sparsec.cli import options_markdown
from sparsec.pipeline import Kind, registry
from tests.test_readme import ROOT
from tests.troubleshooting_cases import CASES, setup

DOCS = ROOT / "docs"


def test_every_pass_has_a_page_whose_options_match_the_code():
    for pass_id, cls in registry().items():
        page = DOCS / "passes" / f"{pass_id}.md"
        assert page.exists(), f"docs/passes/{pass_id}.md is missing"
        text = page.read_text()
        block = re.search(r"<!-- options:.*?-->\n(.*?)<!-- /options -->", text, re.S)
        assert block, f"{page.name}: no generated options block"
        assert block.group(1).strip().splitlines() == options_markdown(cls), \
            f"{page.name}: options table is stale; regenerate with `sparsec passes --markdown {pass_id}`"
        assert ("**Lossy.**" in text) == (Kind.LOSSY in cls.kinds)


@pytest.mark.integration
def test_troubleshooting_messages_are_real(tmp_path):
    setup(tmp_path)
    doc = (DOCS / "troubleshooting.md").read_text()
    for args, code in CASES:
        proc = subprocess.run([sys.executable, "-m", "sparsec", *args], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == code, (args, proc.stderr)
        message = proc.stderr.strip().replace(str(tmp_path), "/tmp/x")
        assert message.count("\n") == 0 and "Traceback" not in message
        assert f"    {message}\n" in doc, f"docs/troubleshooting.md lacks the message of {args}:\n{message}"
        assert f"`sparsec {' '.join(args)}`" in doc


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", text):
        assert (ROOT / link).exists(), link


def test_docs_install_only_what_works():
    """sparsec is not on PyPI: no page may tell users to 'pip install sparsec'."""
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for line in page.read_text().splitlines():
            assert not re.search(r"pip install sparsec(\s|$|\[)", line), f"{page.name}: {line}"
