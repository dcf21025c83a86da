"""Reports: JSON, Markdown, and one self-contained HTML file that renders (structure checked
with an HTML parser, embedded PNGs decoded); sweeps and the Python API."""

import base64
import json
from html.parser import HTMLParser

import pytest

import sparsec
from sparsec.cli import main
from sparsec.errors import OptionError


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.external, self.tables = set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "script") or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append(tag)
        self.tables += tag == "table"


def parse(path):
    page = _Page()
    page.feed(path.read_text())
    for src in page.images:
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    return page


def test_html_markdown_and_json_reports(zoo_path, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["compile", str(zoo_path("tiny-llama")), "--passes", "nm:min_params=0", "--best-effort", "-o", str(out),
                 "--report", str(tmp_path / "r.html"), "--report", str(tmp_path / "r.md"),
                 "--report", str(tmp_path / "r.json"), "--benchmark"])
    assert code == 0
    page = parse(tmp_path / "r.html")
    assert {"summary", "plan", "passes", "verification", "sparsity", "pareto", "size"} <= page.ids
    assert not page.external and page.tables >= 3 and len(page.images) == 3
    md = (tmp_path / "r.md").read_text()
    assert "## Plan" in md and "| nm | lossy |" in md and "perplexity_candidate" in md
    data = json.loads((tmp_path / "r.json").read_text())
    speed = data["speed"]
    assert speed["speedup_p10"] <= speed["speedup"] <= speed["speedup_p90"] and speed["repeats"] >= 15
    assert speed["speedup"] == pytest.approx(speed["original_ms"] / speed["compiled_ms"], rel=0.5)
    assert len(data["weights_after"]) == 14
    assert "speed:" in capsys.readouterr().out
    assert main(["compile", str(zoo_path("tiny-llama")), "-o", str(out), "--report", str(tmp_path / "r.pdf")]) == 2


def test_sweep_with_pareto_report(zoo_path, tmp_path, capsys):
    code = main(["sweep", str(zoo_path("tiny-bert")), "--passes", "ffn-neurons:ratio=0.5",
                 "--passes", "attention-heads:ratio=0.5", "--repeats", "3",
                 "--report", str(tmp_path / "s.html"), "--report", str(tmp_path / "s.json")])
    assert code == 0
    page = parse(tmp_path / "s.html")
    assert "pareto" in page.ids and len(page.images) == 1
    data = json.loads((tmp_path / "s.json").read_text())
    assert [p["label"] for p in data["points"]][0] == "original" and len(data["points"]) == 3
    assert any(p["pareto"] for p in data["points"])
    assert "| original | - | 1.0000 |" in capsys.readouterr().out


def test_python_api_mirrors_the_cli(zoo_path, tmp_path):
    import onnx

    result = sparsec.compile(str(zoo_path("tiny-bert")), target="ampere", passes="nm:min_params=0", best_effort=True,
                             output=tmp_path / "a.onnx")
    assert result.records[0].pass_id == "nm" and result.report()["target"] == "ampere"
    proto = onnx.load(str(zoo_path("cnn")))
    result = sparsec.compile(proto, passes="conv-channels:multiple=1", output=tmp_path / "b.onnx")
    assert result.output.exists() and result.records[0].changed
    with pytest.raises(OptionError, match="output"):
        sparsec.compile(proto, passes="nm")
    assert sparsec.testing.assert_equivalent(tmp_path / "a.onnx", tmp_path / "a.onnx").passed
